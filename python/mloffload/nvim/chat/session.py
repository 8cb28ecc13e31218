"""One chat: sends the message under its last "## You", streams the answer into the buffer,
and saves the chat as it goes.

Methods run on the event loop except ``_work`` (a worker thread), which only produces text
and facts and hands every change to the loop. A message sent while an answer streams is
queued and goes out when that answer ends.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..client import ModelFacts
from ..errors import user_error
from ..options import PluginOptions
from ..requests import Ticket
from ..routing import Route
from ..services import Services
from ..stream import Batcher, Generation
from . import store
from .context import Item, budget_for, fit, refs_in
from .transcript import (
    error_line,
    heading,
    parse,
    pending_message,
    status_line,
    title_of,
    to_messages,
    usage_parts,
)

log = logging.getLogger("mloffload.nvim")


@dataclasses.dataclass
class _Turn:
    ticket: Ticket
    gen: Generation
    batcher: Batcher
    started: bool = False  # the answer's heading is in the buffer


class _Listener:
    """A turn's progress, from the worker thread to the chat's title."""

    def __init__(self, session: ChatSession, turn: _Turn) -> None:
        self.session, self.turn = session, turn

    def _later(self, **status: Any) -> None:
        self.session.s.bridge.later(self.session.status_of, self.turn, status)

    def on_route(self, route: Route, facts: ModelFacts) -> None:
        where = "local fallback" if route.is_fallback else f"server {route.backend}"
        self._later(model=facts.id, where=where, state="connecting…", level="waiting")

    def on_queue(self, ahead: int) -> None:
        self._later(state=f"waiting: {ahead} ahead", level="waiting")

    def on_load(self, event: Any) -> None:
        if event.stage == "loading":
            self._later(state=f"loading model {event.model} ({event.layers})…",
                        level="waiting")
        else:
            self._later(state="answering…", level="")

    def on_first_text(self) -> None:
        self._later(state="answering…", level="")


class ChatSession:
    def __init__(self, services: Services, buf: int, path: Path | None,
                 meta: store.ChatMeta) -> None:
        self.s = services
        self.buf = buf
        self.path = path
        self.meta = meta
        self.turn: _Turn | None = None
        self.queued: PluginOptions | None = None  # a message sent while answering
        self.closed = False

    @property
    def busy(self) -> bool:
        return self.turn is not None

    # --- event loop ---------------------------------------------------------------------

    def send(self, lines: Sequence[str], opts: PluginOptions) -> None:
        turns = parse(lines)
        message = pending_message(turns)
        if self.turn is not None:
            if message is None:
                self.s.bridge.notify("an answer is streaming: type your next message under "
                                     "the last ## You, and send it", "warn")
                return
            self.queued = opts
            self._status(state="answering… (your next message is queued)")
            self.s.bridge.notify("queued: your message is sent when this answer ends")
            return
        if message is None:
            self.s.bridge.notify("nothing to send: type your message under the last ## You",
                                 "warn")
            return
        refs = refs_in(message.typed)
        items = [Item.from_lua(raw) for raw in
                 self.s.lua.context_gather(self.buf, [r.to_lua() for r in refs])] if refs else []
        if self.meta.title == "new chat":
            self.meta.title = title_of(turns)
        self.meta.requested_model = opts.model
        self.meta.params = dict(opts.params)
        gen = Generation(self.s.router, opts)
        ticket = self.s.requests.start("chat", opts.model, buf=self.buf)
        turn = _Turn(ticket, gen, Batcher(self.s.bridge, self._stream_text))
        self.turn = turn
        self._status(title=self.meta.title, state="connecting…", level="waiting")
        self.s.bridge.spawn("chat", lambda: self._work(turn, turns, items),
                            lambda exc: self._end(turn, exc))

    def cancel(self) -> bool:
        if self.turn is None:
            return False
        self.turn.gen.cancel.set()
        return True

    def save(self, lines: Sequence[str] | None = None) -> None:
        """Write the chat's file (when saving is on and something was ever sent)."""
        if self.path is None or self.closed:
            return
        if lines is None:
            lines = self.s.lua.chat_lines(self.buf)
        if not any(t.role == "assistant" for t in parse(lines)) and self.turn is None:
            return
        try:
            store.save(self.path, self.meta, lines)
        except store.StoreError as exc:
            log.warning("%s", exc)
            self.s.bridge.notify(str(exc), "warn")

    def status_of(self, turn: _Turn, status: dict[str, Any]) -> None:
        if turn is self.turn:
            self._status(**status)

    def _status(self, **status: Any) -> None:
        if not self.closed:
            self.s.lua.chat_status(self.buf, status)

    # --- the worker thread --------------------------------------------------------------

    def _work(self, turn: _Turn, turns: Sequence[Any], items: Sequence[Item]) -> None:
        gen = turn.gen
        listener = _Listener(self, turn)
        facts = gen.prepare(listener)
        history = to_messages(turns)
        fitted = fit(items, budget_for(facts.n_ctx, gen.opts.max_tokens, history), facts.n_ctx)
        if fitted.lines and history and history[-1]["role"] == "user":
            history[-1]["content"] += "\n" + "\n".join(fitted.lines)
        before = fitted.lines + (["", *fitted.notes] if fitted.notes else [])
        self.s.bridge.later(self._begin, turn, heading(facts.id), before)
        for piece in gen.pieces(history, listener):
            turn.batcher.push(piece)
        turn.batcher.push("", last=True)
        self.s.bridge.later(self._end, turn, None)

    # --- back on the loop ---------------------------------------------------------------

    def _begin(self, turn: _Turn, head: str, before: list[str]) -> None:
        if self.closed or turn is not self.turn or turn.gen.cancel.is_set():
            return
        turn.started = self.s.lua.chat_answer_start(self.buf, head, before)
        self.save()

    def _stream_text(self, text: str) -> None:
        turn = self.turn
        if turn is not None and turn.started and not self.closed:
            self.s.lua.chat_stream(self.buf, text)

    def _end(self, turn: _Turn, error: BaseException | None) -> None:
        """The turn is over: its status line (or why it stopped), the file, the event."""
        if turn is not self.turn:
            return
        turn.batcher.flush()
        turn.batcher.closed = True
        self.turn = None
        gen = turn.gen
        result = gen.result
        message = user_error(error) if error is not None else ""
        if error is not None:
            line = error_line(message)
            status = {"state": "error — see the last answer" if turn.started else
                      f"error: {message} — <CR> sends it again", "level": "error"}
        elif gen.cancelled:
            line = status_line([f"cancelled after {result.completion_tokens} tokens",
                                gen.where])
            status = {"state": "cancelled", "level": ""}
        else:
            ended = time.monotonic()
            load = None
            if gen.load is not None:
                load = {"seconds": gen.load.seconds, "layers": gen.load.layers}
            line = status_line(usage_parts(result.completion_tokens, gen.rate(ended),
                                           ended - gen.started, result.prompt_tokens,
                                           result.finish_reason, gen.where, load))
            status = ({"state": "truncated: max_tokens reached", "level": "waiting"}
                      if gen.truncated else {"state": "done", "level": "done"})
        if not self.closed:
            if turn.started:
                self.s.lua.chat_answer_end(self.buf, ("\n\n" if gen.text else "") + line)
            self._status(**status)
        if error is not None:
            self.s.bridge.notify(message, "error")
        if gen.facts is not None:
            self.meta.model = gen.facts.id
        self.meta.where = gen.where
        self.save()
        self.s.requests.finish(
            turn.ticket, backend=gen.backend, ok=error is None and not gen.cancelled,
            cancelled=gen.cancelled and error is None, error=message or None,
            prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
            finish_reason=result.finish_reason, truncated=gen.truncated,
            **gen.served())
        queued, self.queued = self.queued, None
        if queued is not None and not self.closed:
            self.send(self.s.lua.chat_lines(self.buf), queued)
