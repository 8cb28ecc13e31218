"""Hand text from the model's worker thread to the event loop, cheaply.

The worker appends pieces to a list and wakes the loop only when the consumer is actually
waiting. A consumer that is busy writing finds several pieces on its next turn and sends
them as one write; a consumer that keeps up pays one wake-up per token and nothing more.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator


class TokenPipe:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[str] = []
        self._waiter: asyncio.Future[None] | None = None
        self._want_items = True  # False while the consumer waits only for the end
        self._started = False
        self._done = False
        self._error: BaseException | None = None

    # --- worker thread side ---------------------------------------------------------

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._loop.call_soon_threadsafe(_resolve, waiter)

    def start(self) -> None:
        with self._lock:
            self._started = True
            self._wake()

    def put(self, piece: str) -> None:
        with self._lock:
            self._items.append(piece)
            if self._want_items:
                self._wake()

    def finish(self, error: BaseException | None = None) -> None:
        with self._lock:
            self._done = True
            self._error = error
            self._wake()

    # --- event loop side --------------------------------------------------------------

    async def _wait(self, ready: Callable[[], bool], want_items: bool = True) -> None:
        while True:
            with self._lock:
                if ready():
                    return
                self._want_items = want_items
                waiter = self._waiter = self._loop.create_future()
            await waiter

    async def started(self) -> None:
        """Return once generation has begun; raise what the prompt stage raised."""
        await self._wait(lambda: self._started or self._done)
        if not self._started and self._error is not None:
            raise self._error

    async def next_batch(self) -> str | None:
        """Everything produced since the last call, joined; None once generation is over."""
        await self._wait(lambda: bool(self._items) or self._done)
        with self._lock:
            if self._items:
                items, self._items = self._items, []
                return items[0] if len(items) == 1 else "".join(items)
            if self._error is not None:
                raise self._error
            return None

    async def collect(self) -> str:
        """All the text, once generation is over. Meanwhile the worker does not wake the
        loop for each token: a non-streamed answer costs one wake-up, not one per token."""
        await self._wait(lambda: self._done, want_items=False)
        with self._lock:
            items, self._items = self._items, []
            if self._error is not None:
                raise self._error
        return "".join(items)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def pump(start: Callable[[], Iterator[str]], pipe: TokenPipe) -> BaseException | None:
    """Worker-thread body: run the prompt stage, then feed every piece into the pipe.

    Returns the error that ended it, if any, so the job's bookkeeping can see it.
    """
    try:
        pieces = start()
    except BaseException as exc:
        pipe.finish(exc)
        return exc
    pipe.start()
    try:
        for piece in pieces:
            pipe.put(piece)
    except BaseException as exc:
        pipe.finish(exc)
        return exc
    pipe.finish()
    return None
