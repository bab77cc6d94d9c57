"""cffi loader for the native kernels: header -> cdef, dlopen, ABI check, status -> NativeError."""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "native" / "include" / "pa.h"
LIB_DIR = Path(__file__).resolve().parent / "_lib"


class NativeError(RuntimeError):
    """A native kernel returned a non-zero pa_status, or a library could not be used."""


def read_cdef(header: Path | None = None) -> str:
    """The declarations between PA_CDEF_BEGIN and PA_CDEF_END, comments stripped."""
    header = header or HEADER
    text = header.read_text()
    match = re.search(r"/\* PA_CDEF_BEGIN \*/(.*?)/\* PA_CDEF_END \*/", text, re.S)
    if match is None:
        raise NativeError(f"{header}: no PA_CDEF_BEGIN/PA_CDEF_END block")
    body = re.sub(r"/\*.*?\*/", "", match.group(1), flags=re.S)
    return re.sub(r"//[^\n]*", "", body)


def header_abi_version(cdef: str) -> int:
    match = re.search(r"#define\s+PA_ABI_VERSION\s+(\d+)", cdef)
    if match is None:
        raise NativeError("pa.h does not define PA_ABI_VERSION")
    return int(match.group(1))


@dataclass
class NativeLib:
    """One dlopened library (cpu or cuda) and the cffi module that describes it."""

    backend: str
    ffi: object
    lib: object
    path: Path

    def check(self, status: int, op: str) -> None:
        """Raise NativeError naming the op when a kernel returned a non-zero status."""
        if status != 0:
            err = getattr(self.lib, f"pa_last_error_{self.backend}")()
            detail = self.ffi.string(err).decode(errors="replace") if err else ""
            raise NativeError(f"{op} failed with status {status}: {detail}")

    def ptr(self, tensor, ctype: str):
        """A typed pointer to a contiguous torch tensor's data (no copy)."""
        if not tensor.is_contiguous():
            raise NativeError(f"tensor passed as {ctype} is not contiguous")
        return self.ffi.cast(ctype, tensor.data_ptr())


_lock = threading.Lock()
_loaded: dict[str, NativeLib | NativeError] = {}


def load(backend: str) -> NativeLib:
    """Load libpa_<backend>.so once per process; raise NativeError saying why it cannot be used."""
    with _lock:
        if backend not in _loaded:
            try:
                _loaded[backend] = _open(backend)
            except NativeError as exc:
                _loaded[backend] = exc
        found = _loaded[backend]
    if isinstance(found, NativeError):
        raise found
    return found


def available(backend: str) -> tuple[bool, str]:
    """(True, path) when the library loads, else (False, the reason)."""
    try:
        return True, str(load(backend).path)
    except NativeError as exc:
        return False, str(exc)


def _open(backend: str) -> NativeLib:
    try:
        import cffi
    except ImportError as exc:  # pragma: no cover - cffi is a requirement
        raise NativeError(f"cffi is not installed: {exc}") from exc
    path = LIB_DIR / f"libpa_{backend}.so"
    if not path.exists():
        raise NativeError(f"{path} not found: run `make native` (or `python setup.py build_native`)")
    cdef = read_cdef()
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    try:
        lib = ffi.dlopen(str(path))
    except OSError as exc:
        raise NativeError(f"cannot dlopen {path}: {exc}") from exc
    try:
        version = getattr(lib, f"pa_abi_version_{backend}")()
    except AttributeError as exc:
        raise NativeError(f"{path} does not export pa_abi_version_{backend}") from exc
    expected = header_abi_version(cdef)
    if version != expected:
        raise NativeError(f"{path} has ABI version {version}, pa.h says {expected}: rebuild with `make native`")
    return NativeLib(backend=backend, ffi=ffi, lib=lib, path=path)


def declared_exports(backend: str) -> list[str]:
    """Every pa_*_<backend> function the header declares (CI checks the .so exports them all)."""
    return sorted(set(re.findall(rf"\b(pa_\w+_{backend})\s*\(", read_cdef())))
