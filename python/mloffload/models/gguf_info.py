"""Read a GGUF file's metadata and tensor table without touching the weights.

``gguf.GGUFReader`` builds numpy views of every field, which takes many seconds for a
262k-entry tokenizer vocabulary. This walks the header once with ``struct``, skips the
big arrays, and uses the ``gguf`` package's own type tables (value types, quantization
block sizes, file types) so the numbers match llama.cpp's.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from pathlib import Path
from typing import Any

import gguf

GGUF_MAGIC = b"GGUF"
# Bump when GGUFInfo gains or changes fields: the registry then re-reads every file.
INFO_VERSION = 2
_SCALARS: dict[int, str] = {
    gguf.GGUFValueType.UINT8: "<B",
    gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I",
    gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f",
    gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}
# Arrays longer than this are skipped (tokenizer vocabularies); only their length is kept.
_MAX_ARRAY_KEPT = 64
_TOKENS_KEY = "tokenizer.ggml.tokens"
# FIM tokens as llama.cpp finds them (src/llama-vocab.cpp): the header's ids, else these
# token texts in the vocabulary.
FIM_ROLES = ("pre", "suf", "mid", "rep", "sep")
_DEPRECATED_FIM_KEYS = {"pre": "prefix", "suf": "suffix", "mid": "middle"}
_FIM_KEYS: dict[str, tuple[str, ...]] = {
    role: (f"tokenizer.ggml.fim_{role}_token_id",) + (
        (f"tokenizer.ggml.{_DEPRECATED_FIM_KEYS[role]}_token_id",)
        if role in _DEPRECATED_FIM_KEYS else ())
    for role in FIM_ROLES}
_FIM_TEXTS = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
            "▁<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
            "▁<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
            "▁<MID>", "<|code_middle|>", "<|middle|>"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "sep": ("<|file_sep|>",),
}
_FIM_BY_TEXT = {text.encode(): role for role, texts in _FIM_TEXTS.items() for text in texts}


class GGUFError(ValueError):
    """The file is not a usable GGUF file; the message says why."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_name: str
    n_bytes: int


@dataclasses.dataclass(frozen=True)
class GGUFInfo:
    """What the registry and the offload planner need to know about one model file."""

    path: str
    file_size: int
    version: int
    architecture: str
    name: str
    size_label: str
    parameter_count: int
    file_type: str
    context_length: int
    embedding_length: int
    block_count: int
    head_count: int
    head_count_kv: int
    key_length: int
    value_length: int
    sliding_window: int
    vocab_size: int
    has_chat_template: bool
    chat_template: str
    fim_tokens: tuple[str, ...]  # the FIM roles it has tokens for (pre, suf, mid, rep, sep)
    tensor_bytes_total: int
    token_embd_bytes: int
    output_bytes: int
    block_bytes: tuple[int, ...]
    other_bytes: int

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["block_bytes"] = list(self.block_bytes)
        data["fim_tokens"] = list(self.fim_tokens)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GGUFInfo:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["block_bytes"] = tuple(values.get("block_bytes", ()))
        values["fim_tokens"] = tuple(values.get("fim_tokens", ()))
        return cls(**values)

    @property
    def can_fim(self) -> bool:
        """It has the prefix, suffix and middle tokens /infill needs."""
        return {"pre", "suf", "mid"} <= set(self.fim_tokens)


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, size: int) -> None:
        self.buf = buf
        self.pos = 0
        self.size = size

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError("file is truncated (header ends past the end of the file)")

    def unpack(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        self.need(n)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return bytes(raw).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.unpack("<Q")
        self.need(n)
        self.pos += n

    def value(self, vtype: int) -> Any:
        if vtype == gguf.GGUFValueType.STRING:
            return self.string()
        if vtype == gguf.GGUFValueType.ARRAY:
            item_type = self.unpack("<I")
            count = self.unpack("<Q")
            if count > _MAX_ARRAY_KEPT:
                self.skip_array(item_type, count)
                return _SkippedArray(count)
            return [self.value(item_type) for _ in range(count)]
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise GGUFError(f"unknown metadata value type {vtype}")
        return self.unpack(fmt)

    def fim_token_roles(self, count: int) -> set[str]:
        """Skip a vocabulary (an array of ``count`` strings); return the FIM roles named in
        it. Each entry is its length (8 bytes) and its text, so one search of the array's
        bytes per known name finds it."""
        start = self.pos
        self.skip_array(gguf.GGUFValueType.STRING, count)
        return {role for text, role in _FIM_BY_TEXT.items()
                if self.buf.find(struct.pack("<Q", len(text)) + text, start, self.pos) != -1}

    def skip_array(self, item_type: int, count: int) -> None:
        if item_type == gguf.GGUFValueType.STRING:
            for _ in range(count):
                self.skip_string()
            return
        if item_type == gguf.GGUFValueType.ARRAY:
            for _ in range(count):
                self.value(item_type)
            return
        fmt = _SCALARS.get(item_type)
        if fmt is None:
            raise GGUFError(f"unknown array item type {item_type}")
        n = struct.calcsize(fmt) * count
        self.need(n)
        self.pos += n


@dataclasses.dataclass(frozen=True)
class _SkippedArray:
    count: int


def _tensor_bytes(shape: tuple[int, ...], type_id: int) -> tuple[str, int]:
    try:
        qtype = gguf.GGMLQuantizationType(type_id)
    except ValueError as exc:
        raise GGUFError(f"unknown tensor type {type_id}") from exc
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_elements = 1
    for d in shape:
        n_elements *= d
    return qtype.name, n_elements // block_size * type_size


def _file_type_name(value: Any) -> str:
    if not isinstance(value, int):
        return "unknown"
    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"type {value}"


def read_gguf_info(path: str | Path) -> GGUFInfo:
    """Parse the header of ``path``; raise GGUFError with a reason if it is unusable."""
    p = Path(path)
    try:
        file_size = p.stat().st_size
        with p.open("rb") as fh:
            if file_size < 24:
                raise GGUFError(f"file is too small to be GGUF ({file_size} bytes)")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, str(p), file_size)
    except OSError as exc:
        raise GGUFError(f"cannot read file: {exc.strerror or exc}") from exc
    except (struct.error, UnicodeDecodeError, OverflowError, MemoryError) as exc:
        raise GGUFError(f"corrupt GGUF header: {exc}") from exc


def _parse(buf: mmap.mmap, path: str, file_size: int) -> GGUFInfo:
    cur = _Cursor(buf, file_size)
    if bytes(buf[0:4]) != GGUF_MAGIC:
        raise GGUFError("not a GGUF file (bad magic)")
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise GGUFError(f"unsupported GGUF version {version}")
    n_tensors = cur.unpack("<Q")
    n_kv = cur.unpack("<Q")
    if n_tensors > 1_000_000 or n_kv > 1_000_000:
        raise GGUFError("corrupt GGUF header (implausible counts)")
    kv: dict[str, Any] = {}
    vocab_fim: set[str] = set()
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.unpack("<I")
        if key == _TOKENS_KEY and vtype == gguf.GGUFValueType.ARRAY:
            item_type, count = cur.unpack("<I"), cur.unpack("<Q")
            if item_type == gguf.GGUFValueType.STRING:
                vocab_fim = cur.fim_token_roles(count)
            else:
                cur.skip_array(item_type, count)
            kv[key] = _SkippedArray(count)
            continue
        kv[key] = cur.value(vtype)
    kv["_vocab_fim"] = vocab_fim

    tensors: list[TensorInfo] = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        if n_dims > 8:
            raise GGUFError(f"corrupt tensor entry {name!r} ({n_dims} dimensions)")
        shape = tuple(cur.unpack("<Q") for _ in range(n_dims))
        type_id = cur.unpack("<I")
        offset = cur.unpack("<Q")
        type_name, n_bytes = _tensor_bytes(shape, type_id)
        tensors.append(TensorInfo(name, shape, type_name, n_bytes))
        del offset

    alignment = kv.get("general.alignment", 32)
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    total = sum(t.n_bytes for t in tensors)
    if data_start + total > file_size:
        raise GGUFError(
            f"file is truncated: tensors need {data_start + total} bytes, file has {file_size}"
        )
    return _summarise(kv, tensors, path, file_size, version, total)


def _count(value: Any) -> int:
    if isinstance(value, _SkippedArray):
        return value.count
    return len(value) if isinstance(value, list) else 0


def _summarise(
    kv: dict[str, Any],
    tensors: list[TensorInfo],
    path: str,
    file_size: int,
    version: int,
    total: int,
) -> GGUFInfo:
    arch = str(kv.get("general.architecture", "unknown"))

    def arch_int(key: str, default: int = 0) -> int:
        value = kv.get(f"{arch}.{key}", default)
        if isinstance(value, list):  # per-layer values (some architectures): take the max
            value = max(value) if value else default
        return int(value) if isinstance(value, int | float) else default

    block_count = arch_int("block_count")
    blocks = [0] * block_count
    token_embd = output = other = 0
    for t in tensors:
        if t.name.startswith("blk."):
            idx = int(t.name.split(".")[1])
            if idx < block_count:
                blocks[idx] += t.n_bytes
                continue
        if t.name.startswith("token_embd."):
            token_embd += t.n_bytes
        elif t.name.startswith("output.") or t.name == "output.weight":
            output += t.n_bytes
        else:
            other += t.n_bytes

    head_count = arch_int("attention.head_count")
    embd = arch_int("embedding_length")
    head_dim = embd // head_count if head_count else 0
    param_count = kv.get("general.parameter_count")
    if not isinstance(param_count, int):
        param_count = 0
        for t in tensors:
            n = 1
            for d in t.shape:
                n *= d
            param_count += n

    vocab_size = _count(kv.get(_TOKENS_KEY)) or arch_int("vocab_size")
    fim = tuple(role for role in FIM_ROLES if role in kv["_vocab_fim"] or any(
        isinstance(kv.get(k), int) and 0 <= kv[k] < vocab_size for k in _FIM_KEYS[role]))
    template = kv.get("tokenizer.chat_template", "")
    template = template if isinstance(template, str) else ""
    return GGUFInfo(
        path=path,
        file_size=file_size,
        version=version,
        architecture=arch,
        name=str(kv.get("general.name", Path(path).stem)),
        size_label=str(kv.get("general.size_label", "")),
        parameter_count=int(param_count),
        file_type=_file_type_name(kv.get("general.file_type")),
        context_length=arch_int("context_length"),
        embedding_length=embd,
        block_count=block_count,
        head_count=head_count,
        head_count_kv=arch_int("attention.head_count_kv", head_count),
        key_length=arch_int("attention.key_length", head_dim),
        value_length=arch_int("attention.value_length", head_dim),
        sliding_window=arch_int("attention.sliding_window"),
        vocab_size=vocab_size,
        has_chat_template=bool(template),
        chat_template=template,
        fim_tokens=fim,
        tensor_bytes_total=total,
        token_embd_bytes=token_embd,
        output_bytes=output,
        block_bytes=tuple(blocks),
        other_bytes=other,
    )
