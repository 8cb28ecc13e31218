"""A streamed answer that must first wait for a slot: headers at once, then where it stands.

While the request waits behind busy slots, the client gets an SSE comment ``: queued N``
(N requests ahead of it) at once and every second: it knows why nothing comes yet, and the
comments keep its read timeout from firing. OpenAI clients skip comments. Once served, the
real stream follows; an error after the headers comes as an error event and ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from .errors import APIError
from .manager import OnWait
from .responses import SSE_HEADERS
from .sse import DONE, event


async def close_response(response: Response) -> None:
    """End a streamed response that is given up or done (its own cleanup runs)."""
    close = getattr(response, "relay", None)
    if close is not None:
        await close.close()
    body = getattr(response, "body_iterator", None)
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


class QueuedStream(StreamingResponse):
    def __init__(self, start: Callable[[OnWait], Awaitable[Response]],
                 abandon: Callable[[], None]) -> None:
        super().__init__(self._body(), media_type="text/event-stream", headers=SSE_HEADERS)
        self._start = start
        self._abandon = abandon
        self._began = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._began:  # the client left before the body started
                self._abandon()

    async def _body(self) -> AsyncIterator[bytes]:
        self._began = True
        positions: asyncio.Queue[int] = asyncio.Queue()
        task = asyncio.ensure_future(self._start(positions.put_nowait))
        inner: Response | None = None
        try:
            while not task.done():
                getter = asyncio.ensure_future(positions.get())
                try:
                    await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    getter.cancel()
                if getter.done() and not getter.cancelled():
                    yield b": queued %d\n\n" % getter.result()
            try:
                inner = task.result()
            except APIError as exc:
                yield event(exc.body())
                yield DONE
                return
            if isinstance(inner, StreamingResponse):
                async for chunk in inner.body_iterator:
                    yield chunk if isinstance(chunk, bytes) else str(chunk).encode()
            else:
                yield bytes(inner.body)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            if inner is not None:
                await close_response(inner)
