"""One streamed answer, from the server or the in-process fallback, to the editor in batches.

Chats and :MLEdit both use it: ``Generation.prepare`` picks the route and learns which model
answers (in a worker thread), ``Generation.pieces`` streams the text (switching to the
fallback if the server went away in between), and a ``Batcher`` hands the text to the event
loop: at most one queued update, and at most one per ``FLUSH_INTERVAL`` while text streams,
so a fast model costs one RPC per batch, not per token.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from ..engine.base import FINISH_CANCELLED, FINISH_LENGTH, GenerationResult
from .bridge import Bridge
from .client import ModelFacts, ServerUnreachable
from .options import PluginOptions
from .routing import Route, Router

FLUSH_INTERVAL = 0.03


class Listener(Protocol):
    """What a generation tells its window, from the worker thread (hop to the loop!)."""

    def on_route(self, route: Route, facts: ModelFacts) -> None: ...

    def on_queue(self, ahead: int) -> None: ...

    def on_load(self, event: Any) -> None: ...

    def on_first_text(self) -> None: ...


@dataclasses.dataclass
class Generation:
    """One request's state: written by the worker, read on the loop once it has ended."""

    router: Router
    opts: PluginOptions
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: GenerationResult = dataclasses.field(default_factory=GenerationResult)
    route: Route | None = None
    facts: ModelFacts | None = None
    load: Any = None  # the fallback's LoadEvent once it loaded a model for this request
    started: float = dataclasses.field(default_factory=time.monotonic)
    first: float | None = None
    text: list[str] = dataclasses.field(default_factory=list)

    # --- worker thread ----------------------------------------------------------------

    def prepare(self, listener: Listener) -> ModelFacts:
        route = self.router.route(self.opts)
        facts = self.router.facts(self.opts, route)
        self.route, self.facts = route, facts
        listener.on_route(route, facts)
        return facts

    def pieces(self, messages: Sequence[Mapping[str, Any]], listener: Listener,
               params: Mapping[str, Any] | None = None) -> Iterator[str]:
        """The answer's text pieces; stops when ``cancel`` is set (the stream is closed)."""
        params = self.opts.params if params is None else params
        assert self.route is not None, "prepare() first"
        for piece in self._raw(messages, listener, params):
            if self.cancel.is_set():
                break
            if self.first is None:
                self.first = time.monotonic()
                listener.on_first_text()
            self.text.append(piece)
            yield piece

    def _raw(self, messages: Sequence[Mapping[str, Any]], listener: Listener,
             params: Mapping[str, Any]) -> Iterator[str]:
        route = self.route
        assert route is not None
        if not route.is_fallback:
            client = self.router.client(self.opts)
            stream = client.chat(messages, self.opts.model, params, self.result, self.cancel,
                                 on_queue=listener.on_queue)
            try:
                first = next(stream)
            except StopIteration:
                return
            except ServerUnreachable as exc:  # it went away between the check and the request
                route = self.router.use_fallback(self.opts, exc)
                self.route = route
                self.facts = self.router.facts(self.opts, route)
                listener.on_route(route, self.facts)
            else:
                try:
                    yield first
                    yield from stream
                finally:
                    stream.close()
                return

        def loaded(event: Any) -> None:
            self.load = event
            listener.on_load(event)

        yield from self.router.fallback(self.opts).chat(
            messages, params, self.result, self.cancel, on_load=loaded)

    # --- facts, on the loop once it has ended ------------------------------------------

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set() or self.result.finish_reason == FINISH_CANCELLED

    @property
    def truncated(self) -> bool:
        return self.result.finish_reason == FINISH_LENGTH

    @property
    def backend(self) -> str:
        """"server" or "fallback", for events."""
        return "fallback" if self.route is not None and self.route.is_fallback else "server"

    @property
    def where(self) -> str:
        """Where it ran, for people: "server llamacpp" or "local fallback"."""
        if self.route is None:
            return ""
        if self.route.is_fallback:
            return "local fallback"
        return f"server {self.route.backend}"

    def served(self) -> dict[str, Any]:
        """For the finished event (the statusline reads it): the model that answered and
        its decode rate."""
        out: dict[str, Any] = {}
        if self.facts is not None:
            out["served_by"] = self.facts.id
        if self.result.completion_tokens > 0 and not self.cancelled:
            out["tokens_per_second"] = round(self.rate(time.monotonic()), 1)
        return out

    def rate(self, ended: float) -> float:
        n = self.result.completion_tokens
        if n > 1 and self.first is not None and ended > self.first:
            return (n - 1) / (ended - self.first)
        return n / max(ended - self.started, 1e-6)


class Batcher:
    """Text from a worker thread to ``sink`` on the event loop, in batches."""

    def __init__(self, bridge: Bridge, sink: Callable[[str], None]) -> None:
        self.bridge = bridge
        self.sink = sink
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self._queued = False
        self._last = 0.0  # when the worker last queued an update
        self.closed = False  # set on the loop: nothing more reaches the sink

    def push(self, piece: str, last: bool = False) -> None:
        """Worker thread. Held back while an update is queued, or for up to FLUSH_INTERVAL
        after the last one (the next piece, or the last push, sends it)."""
        now = time.monotonic()
        with self._lock:
            if piece:
                self._pending.append(piece)
            if self._queued or not self._pending:
                return
            if not last and now - self._last < FLUSH_INTERVAL:
                return
            self._queued = True
            self._last = now
        self.bridge.later(self.flush)

    def flush(self) -> None:
        """Event loop."""
        with self._lock:
            text = "".join(self._pending)
            self._pending.clear()
            self._queued = False
        if text and not self.closed:
            self.sink(text)
