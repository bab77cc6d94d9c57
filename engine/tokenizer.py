"""Tokenizer: an HF fast tokenizer (built once from a GGUF, then cached), chat template, incremental detok."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from engine.config import CONFIG_DIR, load_file

ROLES = ("system", "user", "assistant")
CHAT_END_TOKEN = "<|im_end|>"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "pagedecode" / "tokenizers"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CONTEXT_TOKENS = 6            # prompt tokens re-decoded with the first generated ones (leading spaces)
HOLD = "\ufffd"               # what a decoder shows for an incomplete UTF-8 sequence


def load_chat_template(path: str | Path | None = CONFIG_DIR / "chat_template.json") -> str | None:
    """config/chat_template.json's "template" string, or None to use the model's own template."""
    if path is None:
        return None
    template = load_file(path).get("template")
    if template is not None and (not isinstance(template, str) or not template.strip()):
        raise ValueError(f"config file {path}: 'template' must be a non-empty string or null")
    return template


def validate_messages(messages: object) -> list[dict[str, str]]:
    """[{role, content}] with role in ROLES and content a string; ValueError naming the bad field."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: must be a non-empty list of {role, content} objects")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}]: must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role: must be one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content: must be a string, got {type(content).__name__}")
        clean.append({"role": role, "content": content})
    return clean


class Tokenizer:
    """A HF PreTrainedTokenizerFast with the few operations the engine and the web app use."""

    def __init__(self, hf, name: str, chat_template: str | None = None):
        self.hf = hf
        self.name = name
        self.chat_template = chat_template             # None: the model's own template
        backend = hf.backend_tokenizer
        ends = (hf.eos_token_id, backend.token_to_id(CHAT_END_TOKEN))
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in ends if i is not None))
        self.bos_token_id: int | None = hf.bos_token_id
        self.vocab_size: int = len(hf)
        self._byte_decoder = _byte_decoder() if type(backend.decoder).__name__ == "ByteLevel" else None

    @classmethod
    def load(cls, source: str | Path | None = None, cache_dir: str | Path = DEFAULT_CACHE_DIR,
             chat_template_file: str | Path | None = CONFIG_DIR / "chat_template.json") -> "Tokenizer":
        """From a .gguf (cached on disk after the first build), an HF folder, or a weights/ layout."""
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if source is None:
            from engine.weights import default_model_path
            source = default_model_path()
        source = _resolve_layout(Path(source))
        if source.is_file() and source.suffix == ".gguf":
            hf = _from_gguf(source, Path(cache_dir))
        elif source.is_dir() and any((source / n).is_file() for n in TOKENIZER_FILES):
            hf = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        else:
            raise ValueError(f"tokenizer {source}: not a .gguf file or a folder with tokenizer.json")
        if not isinstance(hf, PreTrainedTokenizerFast):
            raise ValueError(f"tokenizer {source}: a fast tokenizer (tokenizer.json) is required")
        name = source.stem if source.is_file() else source.resolve().name
        return cls(hf, name, load_chat_template(chat_template_file))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text: must be a string, got {type(text).__name__}")
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ids; no clean-up of spaces, so decoding is concatenative (see IncrementalDetokenizer)."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the conversation rendered by the chat template (configured, else the model's)."""
        clean = validate_messages(messages)
        if self.chat_template is None and not self.hf.chat_template:
            raise ValueError(f"tokenizer {self.name}: no chat template (set one in config/chat_template.json)")
        ids = self.hf.apply_chat_template(clean, chat_template=self.chat_template, tokenize=True,
                                          add_generation_prompt=add_generation_prompt, return_dict=False)
        return [int(i) for i in ids]

    def token_text(self, token_id: int) -> str:
        """Display text of one token (beam tree); bytes of a partial UTF-8 character shown as \\xNN."""
        text = self.decode([token_id], skip_special_tokens=False)
        if HOLD not in text or self._byte_decoder is None:
            return text
        token = self.hf.convert_ids_to_tokens(int(token_id))
        if token is None or any(ch not in self._byte_decoder for ch in token):
            return text
        return bytes(self._byte_decoder[ch] for ch in token).decode("utf-8", errors="backslashreplace")


class IncrementalDetokenizer:
    """Text deltas of a growing token list, never ending inside a UTF-8 character.

    The prefix/read-offset technique (vLLM, TGI): decode a short window twice, before and after the
    new token, and emit the difference once it no longer ends in U+FFFD. With prompt_ids=None the
    concatenated deltas equal tokenizer.decode(generated ids); prompt ids only give the first tokens
    their mid-text form (a SentencePiece leading space), which byte-level BPE does not need.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = [int(i) for i in (prompt_ids or [])[-CONTEXT_TOKENS:]]
        if context and self._decode(context).endswith(HOLD):
            context = []                                # a prompt cut inside a character: no context
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._text: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes ('' while a character is partial)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(HOLD):
            return ""
        return self._emit(new_text[len(prefix_text):])

    def flush(self) -> str:
        """At the end: whatever was held back (an incomplete character decodes to U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        return self._emit(new_text[len(prefix_text):]) if len(new_text) > len(prefix_text) else ""

    def _emit(self, delta: str) -> str:
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._text.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._text)


def _resolve_layout(source: Path) -> Path:
    """A weights/ layout folder without tokenizer files -> the tokenizer_source its manifest names."""
    manifest = source / "manifest.json"
    if not source.is_dir() or not manifest.is_file() or any((source / n).is_file() for n in TOKENIZER_FILES):
        return source
    try:
        target = json.loads(manifest.read_text()).get("tokenizer_source")
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"tokenizer {manifest}: cannot read ({exc})") from exc
    if not target:
        raise ValueError(f"tokenizer {manifest}: no tokenizer_source and no tokenizer files in {source}")
    return source / target


def _cache_key(path: Path) -> str:
    """sha256 of the file's first 4 MiB (header, tokenizer arrays) + its size + transformers' version."""
    import transformers

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(4 << 20))
    return f"{digest.hexdigest()[:32]}-{path.stat().st_size}-tf{transformers.__version__}"


def _from_gguf(path: Path, cache_dir: Path):
    """Build the HF tokenizer from a GGUF once (seconds) and keep it under cache_dir (then ~0.1 s)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = cache_dir / _cache_key(path)
    if (folder / "tokenizer.json").is_file():
        try:
            return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, json.JSONDecodeError):
            shutil.rmtree(folder, ignore_errors=True)   # a damaged cache entry: rebuild it
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=cache_dir))
    hf.save_pretrained(str(tmp))
    try:
        os.rename(tmp, folder)                          # atomic; another process may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return hf


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable character that stands for each byte, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars
