"""The cffi loader: header block, ABI version check, exports, errors."""
from __future__ import annotations

import subprocess

import pytest

from engine import native


def test_cdef_block_parses_and_names_the_version():
    cdef = native.read_cdef()
    assert native.header_abi_version(cdef) >= 2
    import cffi
    cffi.FFI().cdef(cdef)                      # plain C that cffi accepts


def test_cpu_library_loads_and_exports_every_declared_symbol():
    lib = native.load("cpu")
    assert lib.lib.pa_abi_version_cpu() == native.header_abi_version(native.read_cdef())
    exported = subprocess.run(["nm", "-D", "--defined-only", str(lib.path)], capture_output=True, text=True,
                              check=True).stdout
    missing = [name for name in native.declared_exports("cpu") if f" {name}" not in exported]
    assert not missing, f"libpa_cpu.so lacks {missing}"


def test_version_mismatch_is_refused(tmp_path, monkeypatch):
    header = tmp_path / "pa.h"
    text = native.HEADER.read_text()
    wrong = native.header_abi_version(native.read_cdef()) + 1
    header.write_text(text.replace("#define PA_ABI_VERSION", f"#define PA_ABI_VERSION {wrong} //"))
    monkeypatch.setattr(native, "HEADER", header)
    monkeypatch.setattr(native, "_loaded", {})
    with pytest.raises(native.NativeError, match="ABI version"):
        native.load("cpu")


def test_missing_library_says_how_to_build(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "LIB_DIR", tmp_path)
    monkeypatch.setattr(native, "_loaded", {})
    ok, why = native.available("cpu")
    assert not ok and "make native" in why


def test_bad_arguments_raise_native_error():
    import torch
    lib = native.load("cpu")
    x = torch.randn(4, 8)
    with pytest.raises(native.NativeError, match="not contiguous"):
        lib.ptr(x.t(), "float *")
    with pytest.raises(native.NativeError, match="failed with status"):
        lib.check(1, "pa_test_op_cpu")
