"""ml-offload's remote plugin (pynvim): the thin entry point.

``:UpdateRemotePlugins`` imports this file to read the handlers below, so it does no work
at import time: the implementation (``mloffload.nvim``) is imported on the first call.
When the ``mloffload`` package is not installed in the host Python, the checkout's own
``python/`` folder is used, so a plugin manager's clone works with only ``pynvim`` and
``httpx`` installed.

The user commands are the Lua layer's (``lua/ml-offload/commands.lua``); they reach the
plugin through ``MLOffloadCall(action, payload)``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pynvim

_CHECKOUT_PYTHON = Path(__file__).resolve().parent.parent.parent / "python"
if importlib.util.find_spec("mloffload") is None and _CHECKOUT_PYTHON.is_dir():
    sys.path.insert(0, str(_CHECKOUT_PYTHON))


@pynvim.plugin
class MLOffload:
    """Each handler hands over to ``mloffload.nvim.app.App`` and returns at once."""

    def __init__(self, nvim: Any) -> None:
        self.nvim = nvim
        self._app: Any = None

    def _run(self, method: str, *args: Any) -> Any:
        try:
            if self._app is None:
                from mloffload.nvim.app import App

                self._app = App(self.nvim)
            return getattr(self._app, method)(*args)
        except Exception as exc:  # never a traceback in the user's face
            self._report(exc)
            return None

    def _report(self, exc: Exception) -> None:
        try:
            from mloffload.nvim.errors import user_error

            message = user_error(exc)
        except Exception:
            message = f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(Exception):
            self.nvim.exec_lua("require('ml-offload').notify(...)", message, 4)

    @pynvim.function("MLOffloadCall")
    def ml_offload_call(self, args: list[Any]) -> None:
        """From the Lua layer: ``MLOffloadCall(action, payload)``."""
        action = str(args[0]) if args else ""
        payload = args[1] if len(args) > 1 and isinstance(args[1], dict) else {}
        self._run("call", action, payload)

    @pynvim.function("MLOffloadHealth", sync=True)
    def ml_offload_health(self, args: list[Any]) -> dict[str, Any]:
        """Facts for ``:checkhealth ml-offload``, from inside the host that runs the plugin."""
        result = self._run("health")
        return result if isinstance(result, dict) else {}
