"""A chat float: the conversation, its buffer, and each answer streaming in from a thread.

The worker thread only produces text; every buffer change happens on the event loop
(``Bridge.later``), appended at the buffer's end. Pieces that arrive while an update is
still queued are merged into it, so a fast model costs one RPC per batch, not per token.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

from ..engine.base import FINISH_CANCELLED, GenerationResult
from .bridge import Bridge
from .client import ServerUnreachable
from .options import PluginOptions
from .routing import Route, Router

FLOAT = "ml-offload.float"
# At most one buffer update per this many seconds while text streams in (a fast GPU makes
# hundreds of tokens a second; the eye needs far fewer updates, the editor likes fewer).
FLUSH_INTERVAL = 0.03
_request_ids = itertools.count(1)


def user_message(prompt: str, context: str = "", filetype: str = "") -> str:
    """The user's turn as sent and shown: the question, then the selection in a fence."""
    prompt = prompt.strip()
    if not context:
        return prompt
    fence = "```"
    while fence in context:
        fence += "`"
    return f"{prompt}\n\n{fence}{filetype}\n{context}\n{fence}"


def turn_lines(content: str) -> list[str]:
    """The lines a turn adds: the user's text, then the assistant's (empty) heading."""
    return ["### You", *content.split("\n"), "", "### Assistant", ""]


def usage_line(result: GenerationResult, started: float, first: float | None, ended: float,
               backend: str) -> str:
    n = result.completion_tokens
    elapsed = ended - (first if first is not None else started)
    rate = (n - 1) / elapsed if n > 1 and elapsed > 0 else n / max(ended - started, 1e-6)
    prompt = f" · {result.prompt_tokens} prompt tokens" if result.prompt_tokens else ""
    return (f"_{n} tokens · {rate:.1f} tokens/s · {ended - started:.1f} s{prompt} · "
            f"{backend}_")


@dataclasses.dataclass
class _Turn:
    """One request's bookkeeping; written by the worker, read on the loop once it ends."""

    id: int
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: GenerationResult = dataclasses.field(default_factory=GenerationResult)
    route: Route | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)
    first: float | None = None
    parts: list[str] = dataclasses.field(default_factory=list)
    loading_row: int | None = None


class ChatSession:
    """One chat float and its history. Methods without ``_work`` run on the event loop."""

    def __init__(self, bridge: Bridge, router: Router, opts: PluginOptions, buf: int) -> None:
        self.bridge = bridge
        self.router = router
        self.buf = buf
        self.model = opts.model
        self.messages: list[dict[str, Any]] = []
        if opts.system_prompt:
            self.messages.append({"role": "system", "content": opts.system_prompt})
        self.turn: _Turn | None = None
        self.closed = False
        self._pending: list[str] = []
        self._pending_lock = threading.Lock()
        self._flush_queued = False
        self._last_flush = 0.0  # when the worker last queued an update

    @property
    def busy(self) -> bool:
        return self.turn is not None

    # --- starting a turn (event loop) ---------------------------------------------------

    def ask(self, content: str, opts: PluginOptions, first_turn: bool) -> None:
        if not first_turn:
            self.bridge.lua(FLOAT, "append", self.buf, "\n\n" + "\n".join(turn_lines(content)))
        self.model = opts.model
        self.messages.append({"role": "user", "content": content})
        turn = _Turn(next(_request_ids))
        self.turn = turn
        self.bridge.event("started", {"id": turn.id, "kind": "chat", "model": self.model,
                                      "buf": self.buf})
        history = [dict(m) for m in self.messages]
        self.bridge.spawn("chat", lambda: self._work(turn, opts, history),
                          lambda exc: self._end(turn, exc))

    def cancel(self) -> bool:
        if self.turn is None:
            return False
        self.turn.cancel.set()
        return True

    # --- the worker thread --------------------------------------------------------------

    def _work(self, turn: _Turn, opts: PluginOptions, history: list[dict[str, Any]]) -> None:
        route = self.router.route(opts)
        self._set_route_later(turn, route, opts)
        stream = self._pieces(turn, route, opts, history)
        try:
            for piece in stream:
                if turn.cancel.is_set():  # nothing more shows once the user cancelled
                    break
                if turn.first is None:
                    turn.first = time.monotonic()
                turn.parts.append(piece)
                self._push(piece)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
            self._push("", last=True)
        self.bridge.later(self._end, turn, None)

    def _pieces(self, turn: _Turn, route: Route, opts: PluginOptions,
                history: list[dict[str, Any]]) -> Iterator[str]:
        if not route.is_fallback:
            client = self.router.client(opts)
            stream = client.chat(history, opts.model, opts.params, turn.result, turn.cancel)
            try:
                first = next(stream)
            except StopIteration:
                return
            except ServerUnreachable as exc:  # it went away between the check and the request
                route = self.router.use_fallback(opts, exc)
                self._set_route_later(turn, route, opts)
            else:
                yield first
                yield from stream
                return
        fallback = self.router.fallback(opts)
        yield from fallback.chat(history, opts.params, turn.result, turn.cancel,
                                 on_load=lambda ev: self.bridge.later(self._show_load, turn, ev))

    def _set_route_later(self, turn: _Turn, route: Route, opts: PluginOptions) -> None:
        turn.route = route
        model = opts.fallback_model if route.is_fallback else opts.model
        self.bridge.later(self._retitle, model, route.backend)

    def _push(self, piece: str, last: bool = False) -> None:
        """Queue text for the buffer. Held back while an update is queued, or for up to
        FLUSH_INTERVAL after the last one (the next piece or the end sends it)."""
        now = time.monotonic()
        with self._pending_lock:
            if piece:
                self._pending.append(piece)
            if self._flush_queued or not self._pending:
                return
            if not last and now - self._last_flush < FLUSH_INTERVAL:
                return
            self._flush_queued = True
            self._last_flush = now
        self.bridge.later(self._flush)

    # --- buffer updates (event loop) ----------------------------------------------------

    def _flush(self) -> None:
        with self._pending_lock:
            text = "".join(self._pending)
            self._pending.clear()
            self._flush_queued = False
        if text and not self.closed:
            self.bridge.lua(FLOAT, "append", self.buf, text)

    def _retitle(self, model: str, backend: str) -> None:
        if not self.closed:
            self.bridge.lua(FLOAT, "set_title", self.buf, [model, backend])

    def _show_load(self, turn: _Turn, event: Any) -> None:
        if self.closed:
            return
        if event.stage == "loading":
            count = int(self.bridge.lua(FLOAT, "line_count", self.buf))
            turn.loading_row = count - 1
            text = f"_loading model {event.model} ({event.layers})…_"
            self.bridge.lua(FLOAT, "set_lines", self.buf, count - 1, count, [text, ""])
        elif turn.loading_row is not None:
            text = (f"_local fallback: {event.model} loaded in {event.seconds:.2f} s "
                    f"({event.layers})_")
            row = turn.loading_row
            self.bridge.lua(FLOAT, "set_lines", self.buf, row, row + 1, [text])
            self._retitle(event.model, turn.route.backend if turn.route else "")

    def _end(self, turn: _Turn, error: BaseException | None) -> None:
        """The turn is over: usage (or why not), history, events."""
        self._flush()
        self.turn = None
        answer = "".join(turn.parts)
        cancelled = turn.cancel.is_set() or turn.result.finish_reason == FINISH_CANCELLED
        backend = turn.route.backend if turn.route else ""
        if error is not None:
            footer = f"_error: {error}_"
        elif cancelled:
            footer = f"_cancelled · {backend}_"
        else:
            footer = usage_line(turn.result, turn.started, turn.first, time.monotonic(), backend)
        if answer:
            self.messages.append({"role": "assistant", "content": answer})
        elif self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()  # nothing came back: a retry should not repeat the question
        if not self.closed:
            self.bridge.lua(FLOAT, "append", self.buf, "\n\n" + footer)
        if error is not None:
            self.bridge.notify(str(error), "error")
        self.bridge.event("finished", {
            "id": turn.id, "kind": "chat", "model": self.model, "buf": self.buf,
            "backend": "fallback" if turn.route and turn.route.is_fallback else "server",
            "ok": error is None and not cancelled, "cancelled": cancelled,
            "error": str(error) if error is not None else None,
            "prompt_tokens": turn.result.prompt_tokens,
            "completion_tokens": turn.result.completion_tokens,
            "finish_reason": turn.result.finish_reason,
        })
