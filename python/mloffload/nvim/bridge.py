"""The one way this plugin talks to Neovim, from the host's event loop or from a thread.

pynvim's rule: only the event loop may call Neovim. Worker threads hand callables to
``later``, which goes through ``nvim.async_call``. Every callable runs guarded: a failure
is logged and never reaches the user as a traceback.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("mloffload.nvim")

LEVELS = {"debug": 1, "info": 2, "warn": 3, "error": 4}

_CALL_LUA = "local mod, fn = ...; return require(mod)[fn](select(3, ...))"


class Bridge:
    def __init__(self, nvim: Any) -> None:
        self.nvim = nvim

    # --- on the event loop ------------------------------------------------------------

    def lua(self, module: str, fn: str, *args: Any) -> Any:
        """``require(module)[fn](...)`` in Neovim; returns its result."""
        return self.nvim.exec_lua(_CALL_LUA, module, fn, *args)

    def notify(self, message: str, level: str = "info") -> None:
        """One clear message, prefixed "ml-offload: " (vim.notify, so it lands in :messages)."""
        try:
            self.lua("ml-offload", "notify", message, LEVELS[level])
        except Exception:  # the editor is going away, or the Lua layer is missing
            log.exception("notify failed: %s", message)

    def event(self, stage: str, data: dict[str, Any]) -> None:
        self.lua("ml-offload", "_event", stage, data)

    # --- from any thread ----------------------------------------------------------------

    def later(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the event loop (nvim.async_call), guarded."""
        self.nvim.async_call(self.guarded, fn, *args)

    def guarded(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("UI update %s failed", getattr(fn, "__qualname__", fn))

    def spawn(self, name: str, work: Callable[[], None],
              on_error: Callable[[BaseException], None]) -> threading.Thread:
        """Run ``work`` in a daemon thread; an exception goes to ``on_error`` on the loop."""

        def run() -> None:
            try:
                work()
            except Exception as exc:
                log.warning("%s failed: %s", name, exc, exc_info=True)
                self.later(on_error, exc)

        thread = threading.Thread(target=run, name=f"ml-offload-{name}", daemon=True)
        thread.start()
        return thread
