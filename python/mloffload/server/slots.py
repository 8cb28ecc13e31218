"""A model's slots: how many of its requests run at once, the rest waiting in order."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable


class SlotGate:
    """A FIFO semaphore: ``slots`` holders at once, the rest wait in arrival order."""

    def __init__(self, slots: int) -> None:
        self.slots = max(1, slots)
        self.busy = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def locked(self) -> bool:
        return self.busy >= self.slots

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def ahead_of(self, fut: asyncio.Future[None]) -> int:
        """How many wait in front of ``fut`` (the position a queued client is shown)."""
        n = 0
        for w in self._waiters:
            if w is fut:
                return n
            if not w.done():
                n += 1
        return n

    async def acquire(self, on_wait: Callable[[asyncio.Future[None]], None] | None = None
                      ) -> None:
        if self.busy < self.slots and not self.waiting:
            self.busy += 1
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        if on_wait is not None:
            on_wait(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted just as it was cancelled: pass the slot on
            else:
                self._discard(fut)
            raise

    def _discard(self, fut: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot goes straight to the next in line
                return
        self.busy = max(0, self.busy - 1)
