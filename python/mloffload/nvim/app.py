"""The plugin: its parts, the action table the Lua layer calls into, and health facts.

Every action arrives through ``call`` on the host's event loop and returns at once: reading
options and the editor happens there, network and inference in worker threads. The parts
(chat, edit, the information floats) each bring their own actions; a new part adds its
``actions()`` to ``PARTS``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from .actions import Actions, Call, Handler
from .bridge import Bridge
from .chat.chats import Chats
from .client import AuthError, ClientError, ServerError, ServerUnreachable
from .complete import Completions
from .edit import Edits
from .errors import log_path, setup_logging, user_error
from .info import Info
from .options import PluginOptions
from .requests import Requests
from .routing import Router
from .services import Services

log = logging.getLogger("mloffload.nvim")


class Part(Protocol):
    def actions(self) -> Mapping[str, Handler]: ...


PARTS: tuple[Callable[[Services], Part], ...] = (Chats, Edits, Info, Completions)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


class App:
    def __init__(self, nvim: Any) -> None:
        setup_logging(log_path())
        self.nvim = nvim
        bridge = Bridge(nvim)
        self.services = Services(bridge, Router(), Requests(bridge))
        self.parts = [make(self.services) for make in PARTS]
        self.actions = Actions()
        for part in self.parts:
            self.actions.add(part.actions())

    def options(self, payload: Mapping[str, Any] | None = None) -> PluginOptions:
        """The merged configuration the call carried (read once per call)."""
        raw = (payload or {}).get("config")
        if not isinstance(raw, Mapping):
            raw = self.services.lua.config()
        return PluginOptions.from_lua(raw)

    def call(self, action: str, payload: Mapping[str, Any]) -> None:
        """From the Lua layer: ``MLOffloadCall(action, payload)``."""
        self.actions.dispatch(Call(action, payload, self.options(payload)))

    # --- :checkhealth (sync) ---------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        import mloffload

        facts: dict[str, Any] = {
            "python": sys.executable,
            "python_version": sys.version.split()[0],
            "pynvim": _version("pynvim"),
            "httpx": _version("httpx"),
            "mloffload": str(Path(mloffload.__file__).parent),
            "log": str(log_path()),
        }
        opts = self.options()
        router = self.services.router
        server: dict[str, Any] = {"url": opts.api_url, "ok": False}
        client = router.client(opts)
        try:
            server["health"] = client.probe()
            server["vram"] = client.get("/vram")
            server["ok"] = True
        except ClientError as exc:
            server["error"] = str(exc)
            server["unreachable"] = isinstance(exc, ServerUnreachable)
            server["auth"] = isinstance(exc, AuthError)
            if isinstance(exc, ServerError):
                server["status"] = exc.status
        facts["server"] = server
        fb: dict[str, Any] = {"enabled": opts.fallback, "model": opts.fallback_model}
        try:
            fallback = router.fallback(opts)
            fb.update(fallback.readiness())
            fb["state"] = fallback.describe()
        except Exception as exc:
            fb.update({"ok": False, "engine": user_error(exc)})
        facts["fallback"] = fb
        return facts

    def close(self) -> None:
        for part in self.parts:
            close = getattr(part, "close", None)
            if close is not None:
                close()
        self.services.router.close()
