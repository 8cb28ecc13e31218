"""Fill-in-the-middle as llama-server does it: the prompt layout and the infill stop rules.

The authority is the pinned llama.cpp (``tools/server/server-common.cpp``,
``format_prompt_infill``; ``server-context.cpp``, ``process_token``). The layout, with the
repository pattern of https://arxiv.org/pdf/2409.12186 when the model has FIM_REP and
FIM_SEP tokens::

    [FIM_REP]myproject\\n
    [FIM_SEP]{filename 0}\\n{chunk 0}
    ...
    [FIM_SEP]filename\\n
    <bos>[FIM_PRE]{prefix}{prompt}[FIM_SUF]{suffix}[FIM_MID]

The extra chunks are cut from the front to ``n_ctx - n_batch - 2 * n_predict`` tokens, the
prefix to its last ``3/4 * n_batch`` tokens and the suffix to its first
``n_batch/4 - 2 - len(prompt)``; ``n_batch`` and ``n_predict`` are the *server's* settings,
not the request's. Without FIM_SEP the chunks are joined by a ``--- snippet ---`` line.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

from .base import GenerationResult

# The layout's n_batch and n_predict: those of our engine processes. They run llama-server
# with --embeddings, which sets n_batch to n_ubatch (512; server.cpp); n_predict is its
# default, -1. In-process uses the same, so both modes build the same prompt.
SERVER_N_BATCH = 512
SERVER_N_PREDICT = -1
TOKEN_NULL = -1
_REPO_NAME = "myproject\n"
_CURRENT_FILE = "filename\n"
_CHUNK_SEPARATOR = "\n\n--- snippet ---\n\n"

# The sampler chain llama-server runs when a request names none (``--samplers``).
DEFAULT_SAMPLERS = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p",
                    "xtc", "temperature")
_SAMPLER_NAMES = {"dry": "dry", "top_k": "top_k", "top_p": "top_p", "nucleus": "top_p",
                  "top_n_sigma": "top_n_sigma", "typ_p": "typ_p", "typ": "typ_p",
                  "typical_p": "typ_p", "min_p": "min_p", "temperature": "temperature",
                  "temp": "temperature", "xtc": "xtc", "infill": "infill",
                  "penalties": "penalties", "adaptive_p": "adaptive_p"}
_SAMPLER_CHARS = {"d": "dry", "k": "top_k", "y": "typ_p", "p": "top_p", "s": "top_n_sigma",
                  "m": "min_p", "t": "temperature", "x": "xtc", "i": "infill",
                  "e": "penalties", "a": "adaptive_p"}


def sampler_names(value: Sequence[str] | str) -> tuple[str, ...]:
    """A request's ``samplers`` (names, or a string of letters) as canonical names; unknown
    ones are dropped, as llama-server does."""
    if isinstance(value, str):
        return tuple(_SAMPLER_CHARS[c] for c in value if c in _SAMPLER_CHARS)
    out = []
    for name in value:
        key = name.replace("-", "_")
        key = _SAMPLER_NAMES.get(key) or next(
            (v for k, v in _SAMPLER_NAMES.items() if k.replace("_", "") == key), "")
        if key:
            out.append(key)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class FimTokens:
    """A model's FIM token ids (``llama_vocab_fim_*``); TOKEN_NULL where it has none."""

    pre: int = TOKEN_NULL
    suf: int = TOKEN_NULL
    mid: int = TOKEN_NULL
    rep: int = TOKEN_NULL
    sep: int = TOKEN_NULL

    @property
    def missing(self) -> list[str]:
        """The tokens /infill needs that the model lacks (llama-server's wording)."""
        return [f"{name} token" for name, tok in
                (("prefix", self.pre), ("suffix", self.suf), ("middle", self.mid))
                if tok == TOKEN_NULL]

    @property
    def usable(self) -> bool:
        return not self.missing


@dataclasses.dataclass(frozen=True)
class InfillInput:
    """What an /infill request asks for (strings, or lists of strings and token ids)."""

    input_prefix: str | Sequence[str | int] = ""
    input_suffix: str | Sequence[str | int] = ""
    input_extra: Sequence[tuple[str, str]] = ()  # (filename, text)
    prompt: str = ""
    n_indent: int = 0
    t_max_predict_ms: int = -1
    samplers: tuple[str, ...] = DEFAULT_SAMPLERS
    cache_prompt: bool = True


@dataclasses.dataclass
class InfillResult(GenerationResult):
    """A generation's facts plus what /infill answers with."""

    prompt: str = ""  # the evaluated prompt, detokenised with its special tokens
    content: str = ""  # the text, after the n_indent cut
    has_new_line: bool = False
    limited: bool = False  # stopped by n_indent or t_max_predict_ms


# tokenize(text, parse_special) → ids, with no BOS/EOS added
Tokenize = Callable[[str, bool], list[int]]


def tokenize_mixed(tokenize: Tokenize, value: str | Sequence[str | int]) -> list[int]:
    """llama-server's ``tokenize_mixed`` with add_special and parse_special off."""
    if isinstance(value, str):
        return tokenize(value, False)
    out: list[int] = []
    for part in value:
        out.extend(tokenize(part, False) if isinstance(part, str) else [int(part)])
    return out


def infill_prompt(tokenize: Tokenize, fim: FimTokens, bos: int | None, inp: InfillInput,
                  n_ctx: int, n_batch: int = SERVER_N_BATCH,
                  n_predict: int = SERVER_N_PREDICT) -> list[int]:
    """The tokens llama-server evaluates for ``inp`` (``format_prompt_infill``, PSM order).
    ``bos`` is the BOS id when the model adds one, else None."""
    extra: list[int] = []
    if fim.rep != TOKEN_NULL:
        extra += [fim.rep, *tokenize(_REPO_NAME, False)]
    for filename, text in inp.input_extra:
        if fim.sep != TOKEN_NULL:
            extra += [fim.sep, *tokenize(filename + "\n", False)]
        else:
            extra += tokenize(_CHUNK_SEPARATOR, False)
        extra += tokenize(text, False)
    if fim.sep != TOKEN_NULL:
        extra += [fim.sep, *tokenize(_CURRENT_FILE, False)]

    prefix = tokenize_mixed(tokenize, inp.input_prefix)
    suffix = tokenize_mixed(tokenize, inp.input_suffix)
    prompt = tokenize(inp.prompt, True) if inp.prompt else []
    n_prefix = min(len(prefix), 3 * (n_batch // 4))
    n_suffix = min(len(suffix), max(0, n_batch // 4 - (2 + len(prompt))))
    n_extra = min(max(0, n_ctx - n_batch - 2 * n_predict), len(extra))

    head = [fim.pre, *prefix[len(prefix) - n_prefix:], *prompt]
    tail = [fim.suf, *suffix[:n_suffix]]
    out = extra[len(extra) - n_extra:]
    if bos is not None:
        out.append(bos)
    return [*out, *head, *tail, fim.mid]


class InfillLimits:
    """llama-server's two infill stop rules, checked after every generated piece.

    ``n_indent``: once the text has a newline, a line that starts (after spaces and tabs)
    with less indentation than ``n_indent`` ends the generation, and that line's text is cut
    from the content (its indentation stays). ``t_max_predict_ms``: after a piece with a
    newline, generation stops once it has run longer than that since the prompt was done.
    """

    def __init__(self, n_indent: int, t_max_predict_ms: int) -> None:
        self.n_indent = n_indent
        self.t_max_predict_ms = t_max_predict_ms
        self.text = ""  # llama-server's generated_text: what the content will be
        self.has_new_line = False
        self._last_nl = 0

    def feed(self, piece: str, prompt_done_at: float | None) -> bool:
        """Add one token's text; True when generation must stop now."""
        self.text += piece
        stop = False
        if self.has_new_line and self.n_indent > 0:
            if self._last_nl > 0:
                pos = self._last_nl
                while pos < len(self.text) and self.text[pos] in " \t":
                    pos += 1
                if pos < len(self.text) and pos - self._last_nl < self.n_indent:
                    self.text = self.text[:pos]
                    stop = True
            nl = self.text.find("\n", self._last_nl)
            if nl != -1:
                self._last_nl = nl + 1
        if "\n" in piece:
            self.has_new_line = True
            if self.t_max_predict_ms > 0 and prompt_done_at is not None and \
                    (time.monotonic() - prompt_done_at) * 1000 > self.t_max_predict_ms:
                stop = True
        return stop
