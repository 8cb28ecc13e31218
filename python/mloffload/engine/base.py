"""The engine interface shared by the server and the Neovim plugin's in-process fallback.

An engine is synchronous and single-threaded by design: the caller runs it in one worker
thread per loaded model and serialises requests. Generation is a generator of text pieces
that stops as soon as ``cancel`` is set.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"


class EngineError(RuntimeError):
    """Generation or embedding failed for a reason the client should hear."""


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


@dataclasses.dataclass
class GenerationResult:
    """Filled in while a generation runs; final once its iterator is exhausted."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


@dataclasses.dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int


class Engine(Protocol):
    model_id: str

    def count_chat_tokens(self, messages: Sequence[dict[str, Any]]) -> int: ...

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

    def embed(self, texts: Sequence[str]) -> Embeddings: ...

    def info(self) -> dict[str, Any]: ...

    def close(self) -> None: ...
