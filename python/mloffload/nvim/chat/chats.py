"""The chat actions: open a chat (new, or a saved one), send, stop, save, and the history
(:MLChatHistory, :MLChatDelete through ``vim.ui.select``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..actions import Call, Handler
from ..services import Services
from . import store
from .context import selection_section
from .session import ChatSession
from .transcript import new_chat, with_input


def _source(call: Call) -> dict[str, Any]:
    source = call.table("source") or {}
    selection = call.table("selection")
    if selection is not None:
        source["selection"] = selection
    return source


class Chats:
    def __init__(self, services: Services) -> None:
        self.s = services
        self.sessions: dict[int, ChatSession] = {}

    def actions(self) -> Mapping[str, Handler]:
        return {
            "chat": self.open,
            "chat_send": self.send,
            "chat_stop": self.stop,
            "chat_save": self.save,
            "chat_closed": self.closed,
            "history": self.history,
            "history_open": self.history_open,
            "history_delete": self.history_delete,
            "history_remove": self.history_remove,
        }

    def _session(self, call: Call) -> ChatSession | None:
        session = self.sessions.get(call.number("buf"))
        return None if session is None or session.closed else session

    # --- opening ------------------------------------------------------------------------

    def open(self, call: Call) -> None:
        """A new chat: about [prompt] (sent at once) and/or the selection (attached)."""
        opts = call.opts
        prompt = call.text("args").strip()
        selection = call.table("selection")
        attached = selection_section(selection) if selection else []
        lines, cursor = new_chat(opts.system_prompt, prompt, attached)
        meta = store.ChatMeta(requested_model=opts.model, params=dict(opts.params))
        path = store.new_path(opts.chat.dir, prompt or "chat", meta.created) \
            if opts.chat.save else None
        session = self._show(lines, meta, path, _source(call), cursor=cursor,
                             insert=not prompt)
        if prompt:
            session.send(lines, opts)

    def sessions_by_path(self, path: Path | None) -> ChatSession | None:
        return next((s for s in self.sessions.values()
                     if path is not None and s.path == path and not s.closed), None)

    def _show(self, lines: list[str], meta: store.ChatMeta, path: Path | None,
              source: Mapping[str, Any], cursor: int | None = None,
              insert: bool = False) -> ChatSession:
        spec: dict[str, Any] = {"lines": lines, "title": meta.title, "source": dict(source),
                                "insert": insert}
        if path is not None:
            spec["name"] = f"ml-offload://chat/{path.stem}"
        if cursor is not None:
            spec["cursor"] = cursor
        window = self.s.lua.chat_open(spec)
        session = ChatSession(self.s, window.buf, path, meta)
        self.sessions[window.buf] = session
        return session

    # --- in a chat ----------------------------------------------------------------------

    def send(self, call: Call) -> None:
        session = self._session(call)
        if session is None:
            self.s.bridge.notify("not a chat buffer (or it was closed): :MLChat opens one",
                                 "warn")
            return
        lines = call.payload.get("lines")
        session.send([str(x) for x in lines] if isinstance(lines, list)
                     else self.s.lua.chat_lines(session.buf), call.opts)

    def stop(self, call: Call) -> None:
        session = self._session(call)
        if session is None or not session.cancel():
            self.s.bridge.notify("nothing to stop", "info")

    def save(self, call: Call) -> None:
        session = self._session(call)
        lines = call.payload.get("lines")
        if session is not None:
            session.save([str(x) for x in lines] if isinstance(lines, list) else None)

    def closed(self, call: Call) -> None:
        session = self.sessions.pop(call.number("buf"), None)
        if session is not None:
            session.closed = True
            session.cancel()

    # --- history ------------------------------------------------------------------------

    def _pick(self, call: Call, action: str, prompt: str) -> None:
        folder = call.opts.chat.dir
        chats = store.listing(folder)
        if not chats:
            self.s.bridge.notify(f"no saved chats yet (in {folder})")
            return
        items = [{"path": str(path), "label": f"{meta.title}  ·  {meta.updated[:16]}  ·  "
                  f"{meta.model or meta.requested_model}"} for path, meta in chats]
        self.s.lua.history_pick(items, action, prompt)

    def history(self, call: Call) -> None:
        self._pick(call, "history_open", "ml-offload: reopen a chat")

    def history_delete(self, call: Call) -> None:
        self._pick(call, "history_remove", "ml-offload: delete a chat")

    def history_open(self, call: Call) -> None:
        path = Path(call.text("path"))
        open_now = self.sessions_by_path(path)
        if open_now is not None:
            self.s.lua.chat_show(open_now.buf, call.table("source"))
            return
        meta, body = store.load(path)
        self._show(with_input(body), meta, path, call.table("source") or {})

    def history_remove(self, call: Call) -> None:
        path = Path(call.text("path"))
        meta, _ = store.load(path)
        store.delete(path)
        session = self.sessions_by_path(path)
        if session is not None:
            session.closed = True
            session.cancel()
            self.sessions.pop(session.buf, None)
            self.s.lua.chat_forget(session.buf)
        self.s.bridge.notify(f'deleted the chat "{meta.title}" ({path.name})')

    def close(self) -> None:
        for session in self.sessions.values():
            session.closed = True
            session.cancel()
