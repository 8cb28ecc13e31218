"""The engine interface shared by the server and the Neovim plugin's in-process fallback.

An engine is synchronous and single-threaded by design: the caller runs it in one worker
thread per loaded model and serialises requests. Generation is a generator of text pieces
that stops as soon as ``cancel`` is set.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .fim import InfillInput, InfillResult

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"


class EngineError(RuntimeError):
    """Generation or embedding failed for a reason the client should hear."""


class Cancelled(EngineError):
    """The work stopped because its ``cancel`` event was set (the client left, or its time
    ran out); what it had done so far is thrown away."""


class FimUnsupported(EngineError):
    """The model has no fill-in-the-middle tokens."""


class InvalidTokens(EngineError):
    """A token id the request gave is not in the model's vocabulary (llama.cpp would read
    out of bounds with it)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(EngineError):
    """The prompt (plus what was asked of the answer) does not fit the context."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: whatever context is left
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


SEED_MODULUS = 2**32 - 1  # llama.cpp takes a 32-bit seed; larger ones are folded into it


def sampling_from(values: Mapping[str, Any],
                  token_limit: Callable[[int | None], int | None] | None = None
                  ) -> SamplingParams:
    """Request fields (OpenAI names) as SamplingParams: the one translation of the server's
    schemas and the plugin's fallback. ``max_completion_tokens`` counts as ``max_tokens``;
    ``token_limit`` applies the server's default and cap; a seed is folded to 32 bits."""
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    out = {k: v for k, v in values.items() if k in fields and v is not None}
    if values.get("max_completion_tokens") is not None:
        out["max_tokens"] = values["max_completion_tokens"]
    if token_limit is not None:
        out["max_tokens"] = token_limit(out.get("max_tokens"))
    stop = out.get("stop")
    if stop is not None:
        out["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    if out.get("seed") is not None:
        out["seed"] = int(out["seed"]) % SEED_MODULUS
    return SamplingParams(**out)


def embedding_batch(memory: int, n_vocab: int, longest: int) -> int:
    """Tokens an embedding evaluates at once within ``memory`` bytes.

    A decoder model computes logits for every token of an embedding batch: 4 bytes per
    vocabulary entry in the output buffer and as much again in the compute buffer, 2 MiB a
    token for Gemma 3's 262k vocabulary. An input longer than the batch is evaluated in
    several, its KV cache carrying the context across."""
    per_token = 8 * max(1, n_vocab)
    return max(16, min(longest, memory // per_token))


@dataclasses.dataclass
class GenerationResult:
    """Filled in while a generation runs; final once its iterator is exhausted."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    # What llama-server's own answers report besides (``/completion``, ``/infill``):
    cached_tokens: int = 0  # prompt tokens reused from the previous request's cache
    stop_word: str = ""  # the stop string that ended the generation
    eog: bool = False  # ended by an end-of-generation token (counted by llama-server)
    truncated: bool = False  # ended because the context was full
    kv_tokens: int = 0  # tokens in the model's cache afterwards
    started_at: float = 0.0  # time.monotonic() stamps: request, prompt done, last token
    prompt_done_at: float | None = None
    last_token_at: float | None = None
    token_ids: list[int] | None = None  # given a list, each generated id is appended


@dataclasses.dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int


class Engine(Protocol):
    model_id: str

    def chat(
        self,
        messages: Sequence[dict[str, Any]],
        params: SamplingParams,
        result: GenerationResult,
        cancel: threading.Event,
    ) -> Iterator[str]: ...

    def complete(
        self,
        prompt: str,
        params: SamplingParams,
        result: GenerationResult,
        cancel: threading.Event,
    ) -> Iterator[str]: ...

    def infill(
        self,
        inp: InfillInput,
        params: SamplingParams,
        result: InfillResult,
        cancel: threading.Event,
    ) -> Iterator[str]:
        """Fill in the middle as llama-server's /infill does (see engine/fim.py); raises
        FimUnsupported when the model has no FIM tokens."""
        ...

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False
                 ) -> list[int]: ...

    def detokenize(self, tokens: Sequence[int], special: bool = True) -> str: ...

    def piece(self, token: int) -> bytes: ...

    def embed(self, texts: Sequence[str], cancel: threading.Event | None = None
              ) -> Embeddings:
        """One mean-pooled, normalised vector per text; raises Cancelled once ``cancel`` is
        set (checked between inputs, and within one where the engine can)."""
        ...

    def info(self) -> dict[str, Any]: ...

    def close(self) -> None: ...
