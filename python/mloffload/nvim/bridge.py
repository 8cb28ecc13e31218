"""The one way this plugin talks to Neovim, from the host's event loop or from a thread.

pynvim's rule: only the event loop may call Neovim. Worker threads hand callables to
``later``, which goes through ``nvim.async_call``. Every callable runs guarded: a failure
is logged and never reaches the user as a traceback. Neovim's Lua is reached only through
``self.lua`` (``lua.Lua``, the typed list of what may be called).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from .lua import Lua

log = logging.getLogger("mloffload.nvim")

LEVELS = {"debug": 1, "info": 2, "warn": 3, "error": 4}


class Bridge:
    def __init__(self, nvim: Any) -> None:
        self.nvim = nvim
        self.lua = Lua(nvim)

    # --- on the event loop ------------------------------------------------------------

    def notify(self, message: str, level: str = "info") -> None:
        """One clear message, prefixed "ml-offload: " (vim.notify, so it lands in :messages)."""
        try:
            self.lua.notify(message, LEVELS[level])
        except Exception:  # the editor is going away, or the Lua layer is missing
            log.exception("notify failed: %s", message)

    def event(self, stage: str, data: dict[str, Any]) -> None:
        self.lua.event(stage, data)

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
