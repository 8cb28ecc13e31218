"""What the routes need from a backend: in-process llama.cpp or a proxied llama-server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from .errors import ClientGone as ClientGone  # re-exported for backends
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

T = TypeVar("T")


class Backend(Protocol):
    name: str  # "llamacpp" or "llama-server"

    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response: ...

    async def completion(self, req: CompletionRequest, request: Request) -> Response: ...

    async def embeddings(self, req: EmbeddingRequest, request: Request) -> Response: ...

    async def models(self) -> dict[str, Any]:
        """The `/v1/models` body."""
        ...

    async def health(self) -> tuple[bool, str, dict[str, Any]]:
        """(ready, reason when not ready, the `backends.llamacpp` entry of `/api/health`)."""
        ...

    async def info(self) -> dict[str, Any]:
        """The `/api/backend/info` body."""
        ...

    def status(self) -> dict[str, Any]:
        """The backend's part of `/status` (loaded models, upstream, ...)."""
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
