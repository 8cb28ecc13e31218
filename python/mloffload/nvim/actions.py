"""The action table: what the Lua layer may ask of the remote plugin, by name.

Lua calls ``MLOffloadCall(action, payload)`` (``require('ml-offload.rpc').request``); the
payload carries the merged configuration, read once here into ``PluginOptions``. Each part
of the plugin (chat, edit, information floats, ...) adds its own actions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from .options import PluginOptions


@dataclasses.dataclass(frozen=True)
class Call:
    """One action as it arrived: its name, its payload, and the options of this call."""

    name: str
    payload: Mapping[str, Any]
    opts: PluginOptions

    def text(self, key: str) -> str:
        value = self.payload.get(key)
        return "" if value is None else str(value)

    def number(self, key: str) -> int:
        try:
            return int(self.payload.get(key) or 0)
        except (TypeError, ValueError):
            return 0

    def table(self, key: str) -> dict[str, Any] | None:
        value = self.payload.get(key)
        return dict(value) if isinstance(value, Mapping) else None


Handler = Callable[[Call], None]


class UnknownAction(LookupError):
    pass


class Actions:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def add(self, handlers: Mapping[str, Handler]) -> None:
        for name, handler in handlers.items():
            if name in self._handlers:
                raise ValueError(f"action {name!r} is defined twice")
            self._handlers[name] = handler

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def dispatch(self, call: Call) -> None:
        handler = self._handlers.get(call.name)
        if handler is None:
            raise UnknownAction(f"unknown action {call.name!r}: the Lua layer and the remote "
                                "plugin differ; run :UpdateRemotePlugins and restart Neovim")
        handler(call)
