"""Every Lua function the Python side may call: one typed method per export of
``lua/ml-offload/rpc.lua``, and nothing else reaches Neovim's Lua.

Call these on the host's event loop only (worker threads go through ``Bridge.later``).
Lua ``nil`` comes back as ``None``; tables as dicts or lists. A ``None`` inside a dict is
left out on the way there (it would arrive as ``vim.NIL``, which is truthy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

_CALL = "return require('ml-offload.rpc').call(...)"


@dataclasses.dataclass(frozen=True)
class Window:
    buf: int
    win: int

    @classmethod
    def of(cls, value: Any) -> Window:
        value = value if isinstance(value, Mapping) else {}
        return cls(int(value.get("buf") or 0), int(value.get("win") or 0))


def _without_none(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_without_none(v) for v in value]
    return value


class Lua:
    def __init__(self, nvim: Any) -> None:
        self._nvim = nvim

    def _call(self, name: str, *args: Any) -> Any:
        return self._nvim.exec_lua(_CALL, name, *(_without_none(a) for a in args))

    # --- messages, events, options ----------------------------------------------------

    def notify(self, message: str, level: int) -> None:
        self._call("notify", message, level)

    def event(self, stage: str, data: Mapping[str, Any]) -> None:
        self._call("event", stage, dict(data))

    def config(self) -> dict[str, Any]:
        value = self._call("config")
        return dict(value) if isinstance(value, Mapping) else {}

    def set_model(self, model: str) -> None:
        self._call("set_model", model)

    # --- information floats -------------------------------------------------------------

    def float_open(self, kind: str, lines: Sequence[str], title: Sequence[str],
                   cursor: int | None = None) -> Window:
        spec: dict[str, Any] = {"kind": kind, "lines": list(lines), "title": list(title)}
        if cursor is not None:
            spec["cursor"] = cursor
        return Window.of(self._call("float_open", spec))

    def float_set_lines(self, buf: int, first: int, last: int, lines: Sequence[str]) -> bool:
        return bool(self._call("float_set_lines", buf, first, last, list(lines)))

    def float_close(self, buf: int) -> None:
        self._call("float_close", buf)

    # --- chat windows -----------------------------------------------------------------

    def chat_open(self, spec: Mapping[str, Any]) -> Window:
        return Window.of(self._call("chat_open", dict(spec)))

    def chat_show(self, buf: int, source: Mapping[str, Any] | None) -> None:
        self._call("chat_show", buf, dict(source) if source else None)

    def chat_lines(self, buf: int) -> list[str]:
        return [str(line) for line in self._call("chat_lines", buf) or []]

    def chat_answer_start(self, buf: int, heading: str, before: Sequence[str]) -> bool:
        return bool(self._call("chat_answer_start", buf,
                               {"heading": heading, "before": list(before)}))

    def chat_stream(self, buf: int, text: str) -> bool:
        return bool(self._call("chat_stream", buf, text))

    def chat_answer_end(self, buf: int, text: str) -> bool:
        return bool(self._call("chat_answer_end", buf, text))

    def chat_status(self, buf: int, status: Mapping[str, Any]) -> None:
        self._call("chat_status", buf, dict(status))

    def chat_find(self, buf: int) -> bool:
        return bool(self._call("chat_find", buf))

    def chat_forget(self, buf: int) -> None:
        self._call("chat_forget", buf)

    def context_gather(self, buf: int, refs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        items = self._call("context_gather", buf, [dict(r) for r in refs]) or []
        return [dict(i) for i in items if isinstance(i, Mapping)]

    def history_pick(self, items: Sequence[Mapping[str, Any]], action: str, prompt: str) -> None:
        self._call("history_pick", [dict(i) for i in items], action, prompt)

    # --- diff proposals -----------------------------------------------------------------

    def diff_open(self, spec: Mapping[str, Any]) -> int:
        return int(self._call("diff_open", dict(spec)) or 0)

    def diff_update(self, proposal: int, lines: Sequence[str]) -> bool:
        return bool(self._call("diff_update", proposal, list(lines)))

    def diff_status(self, proposal: int, state: str, note: str = "") -> bool:
        return bool(self._call("diff_status", proposal, state, note))

    # --- ghost text -------------------------------------------------------------------

    def complete_update(self, request: int, update: Mapping[str, Any]) -> None:
        self._call("complete_update", request, dict(update))
