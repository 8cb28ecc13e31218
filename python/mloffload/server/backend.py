"""What the routes need from a backend, and the typed values a backend hands back."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from .errors import ClientGone as ClientGone  # re-exported for backends
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    InfillRequest,
    TokenizeRequest,
)

T = TypeVar("T")


class HealthState(enum.Enum):
    READY = "ready"
    LOADING = "loading"  # a model is loading: /health 503 model_loading
    UNAVAILABLE = "unavailable"  # the engine or upstream cannot serve: 503 backend_unavailable


@dataclasses.dataclass(frozen=True)
class Health:
    state: HealthState
    reason: str  # why not ready ("" when ready)
    detail: dict[str, Any]  # the `backends.llamacpp` entry of /api/health
    # Remote upstreams (server/upstream/router.py): URL → its entry under `backends`.
    upstreams: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.state is HealthState.READY


@dataclasses.dataclass
class AccessInfo:
    """What the access-log line reports about a request (never its text)."""

    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    queue_ms: float | None = None  # waited for a model's slot (queue and load)

    def tokens(self, prompt: int, completion: int) -> None:
        self.prompt_tokens, self.completion_tokens = prompt, completion


def access(request: Request) -> AccessInfo:
    """The request's AccessInfo (created on first use; guard.py logs it)."""
    info = getattr(request.state, "access", None)
    if not isinstance(info, AccessInfo):
        info = AccessInfo()
        request.state.access = info
    return info


class Backend(Protocol):
    name: str  # "llamacpp", "managed" or "llama-server"

    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response: ...

    async def completion(self, req: CompletionRequest, request: Request) -> Response: ...

    async def embeddings(self, req: EmbeddingRequest, request: Request) -> Response: ...

    async def infill(self, req: InfillRequest, request: Request) -> Response:
        """llama-server's `/infill` (server/fim.py): its fields, answer and stream."""
        ...

    async def tokenize(self, req: TokenizeRequest, request: Request) -> Response:
        """llama-server's `/tokenize` for the model named (the FIM test compares prompts)."""
        ...

    async def detokenize(self, req: DetokenizeRequest, request: Request) -> Response: ...

    async def models(self) -> dict[str, Any]:
        """The `/v1/models` body."""
        ...

    async def health(self) -> Health: ...

    async def load(self, name: str, keep_alive: float | None = None) -> dict[str, Any]:
        """Load a model now (`POST /api/models/{id}/load`, Ollama's empty prompt); the body
        of the answer, with its ``id``. ``keep_alive`` (seconds) replaces the model's own
        and restarts its timer (0: it unloads as soon as nothing runs on it)."""
        ...

    async def unload(self, name: str) -> dict[str, Any]:
        """Unload a model now (`POST /api/models/{id}/unload`); the body of the answer."""
        ...

    async def info(self) -> dict[str, Any]:
        """The `/api/backend/info` body."""
        ...

    def status(self) -> dict[str, Any]:
        """The backend's part of `/status` (loaded models, upstream, ...)."""
        ...

    def engine_pids(self) -> dict[int, dict[str, Any]]:
        """The processes that hold models (pid → model and planned GPU bytes), so `/vram`
        can put NVML's per-process numbers next to the plan."""
        ...


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGone()
