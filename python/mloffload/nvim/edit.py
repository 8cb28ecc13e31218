""":MLEdit {instruction}: the model rewrites a range of lines; the rewrite streams into a
diff proposal (``lua/ml-offload/diff.lua``) the user accepts or rejects. Rejecting (or
closing the proposal) while it is written stops the generation. Server or fallback alike.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .actions import Call, Handler
from .chat.context import fence_for
from .client import ModelFacts
from .errors import user_error
from .requests import Ticket
from .routing import Route
from .services import Services
from .stream import Batcher, Generation

SYSTEM = ("You rewrite code. Follow the instruction exactly. Answer with the rewritten "
          "lines only: no explanation, no markdown fences.")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})")


def edit_messages(instruction: str, lines: Sequence[str], file: str, filetype: str,
                  first: int, last: int) -> list[dict[str, Any]]:
    code = "\n".join(lines)
    fence = fence_for(code)
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": (
            f"Instruction: {instruction}\n\nLines {first}-{last} of {file}"
            f"{f' ({filetype})' if filetype else ''}:\n{fence}{filetype}\n{code}\n{fence}\n\n"
            "Answer with the rewritten lines only.")},
    ]


def extract_code(text: str) -> list[str]:
    """The code in an answer: the first fenced block's content (up to its closing fence,
    or the end while it is still streaming), else the whole text; outer blank lines off."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        opened = FENCE.match(line)
        if opened:
            fence = opened.group(1)
            body: list[str] = []
            for row in lines[i + 1:]:
                if row.strip() == fence:
                    break
                body.append(row)
            lines = body
            break
    while lines and not lines[0].strip():
        lines = lines[1:]
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


@dataclasses.dataclass
class _Edit:
    proposal: int
    ticket: Ticket
    gen: Generation
    batcher: Batcher = dataclasses.field(init=False)
    raw: str = ""
    closed: bool = False


class _Listener:
    def __init__(self, edits: Edits, edit: _Edit) -> None:
        self.edits, self.edit = edits, edit

    def _note(self, text: str) -> None:
        self.edits.s.bridge.later(self.edits.note, self.edit, text)

    def on_route(self, route: Route, facts: ModelFacts) -> None:
        where = "local fallback" if route.is_fallback else f"server {route.backend}"
        self._note(f"connecting… ({facts.id}, {where})")

    def on_queue(self, ahead: int) -> None:
        self._note(f"waiting: {ahead} ahead")

    def on_load(self, event: Any) -> None:
        if event.stage == "loading":
            self._note(f"loading model {event.model} ({event.layers})…")

    def on_first_text(self) -> None:
        self._note("writing…")


class Edits:
    def __init__(self, services: Services) -> None:
        self.s = services
        self.running: dict[int, _Edit] = {}

    def actions(self) -> Mapping[str, Handler]:
        return {"edit": self.start, "proposal_closed": self.proposal_closed}

    def start(self, call: Call) -> None:
        instruction = call.text("args").strip()
        selection = call.table("selection")
        if not instruction:
            self.s.bridge.notify("say what to change: :MLEdit {instruction}", "warn")
            return
        if selection is None or not selection.get("lines"):
            self.s.bridge.notify("nothing to rewrite: select the lines first", "warn")
            return
        source = call.table("source") or {}
        first, last = int(selection["first"]), int(selection["last"])
        lines = [str(x) for x in selection["lines"]]
        proposal = self.s.lua.diff_open({
            "source_buf": selection["buf"], "source_win": source.get("win"), "first": first,
            "last": last, "lines": [], "streaming": True, "title": f"MLEdit: {instruction}"})
        gen = Generation(self.s.router, call.opts)
        ticket = self.s.requests.start("edit", call.opts.model, proposal=proposal)
        edit = _Edit(proposal, ticket, gen)
        edit.batcher = Batcher(self.s.bridge, lambda text: self._grow(edit, text))
        self.running[proposal] = edit
        messages = edit_messages(instruction, lines, str(selection.get("file") or ""),
                                 str(selection.get("filetype") or ""), first, last)
        self.s.bridge.spawn("edit", lambda: self._work(edit, messages),
                            lambda exc: self._end(edit, exc))

    def _work(self, edit: _Edit, messages: list[dict[str, Any]]) -> None:
        listener = _Listener(self, edit)
        edit.gen.prepare(listener)
        for piece in edit.gen.pieces(messages, listener):
            edit.batcher.push(piece)
        edit.batcher.push("", last=True)
        self.s.bridge.later(self._end, edit, None)

    def note(self, edit: _Edit, text: str) -> None:
        if not edit.closed:
            self.s.lua.diff_status(edit.proposal, "streaming", text)

    def _grow(self, edit: _Edit, text: str) -> None:
        edit.raw += text
        if not edit.closed:
            self.s.lua.diff_update(edit.proposal, extract_code(edit.raw))

    def _end(self, edit: _Edit, error: BaseException | None) -> None:
        edit.batcher.flush()
        edit.batcher.closed = True
        self.running.pop(edit.proposal, None)
        gen = edit.gen
        message = user_error(error) if error is not None else ""
        if not edit.closed:
            if error is not None:
                self.s.lua.diff_status(edit.proposal, "error", message)
            elif gen.cancelled:
                self.s.lua.diff_status(edit.proposal, "error", "stopped")
            else:
                self.s.lua.diff_update(edit.proposal, extract_code(edit.raw))
                where = gen.where + (f", {gen.facts.id}" if gen.facts else "")
                tail = ", truncated: max_tokens reached" if gen.truncated else ""
                self.s.lua.diff_status(edit.proposal, "ready",
                                       f"ready ({gen.result.completion_tokens} tokens, "
                                       f"{where}{tail})")
        if error is not None:
            self.s.bridge.notify(message, "error")
        result = gen.result
        self.s.requests.finish(
            edit.ticket, backend=gen.backend, ok=error is None and not gen.cancelled,
            cancelled=gen.cancelled and error is None, error=message or None,
            prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
            finish_reason=result.finish_reason, **edit.gen.served())

    def proposal_closed(self, call: Call) -> None:
        edit = self.running.get(call.number("id"))
        if edit is not None:
            edit.closed = True
            edit.gen.cancel.set()

    def close(self) -> None:
        for edit in self.running.values():
            edit.closed = True
            edit.gen.cancel.set()
