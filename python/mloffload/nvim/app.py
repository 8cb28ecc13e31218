"""The plugin: command handlers, the actions the Lua layer sends, and health facts.

Handlers run on the host's event loop and return at once: reading options and the buffer
happens there, the network and inference happen in worker threads (``Bridge.spawn``).
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..engine.base import EngineError
from .bridge import Bridge
from .chat import FLOAT, ChatSession, turn_lines, user_message
from .client import ClientError, ServerUnreachable
from .options import OptionsError, PluginOptions
from .routing import FALLBACK_LABEL, Router
from .views import MODELS_HEADER, models_lines, status_lines

log = logging.getLogger("mloffload.nvim")
_ids = itertools.count(1_000_000)

def range_given(ev: Mapping[str, Any] | None) -> bool:
    """Whether the user gave :MLChat a range (see RANGE_EVAL in the rplugin entry)."""
    ev = ev or {}
    count = ev.get("first") if ev.get("boot") else ev.get("range")
    try:
        return int(count or 0) > 0
    except (TypeError, ValueError):
        return False


def user_error(exc: BaseException) -> str:
    """A message for the user: ours say what to do; anything else names itself and the log."""
    from .fallback import FallbackUnavailable

    if isinstance(exc, ClientError | FallbackUnavailable | EngineError | OptionsError):
        return str(exc)
    return f"internal error ({type(exc).__name__}: {exc}); details in {log_path()}"


def log_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "nvim" / "ml-offload.log"


def setup_logging(path: Path) -> None:
    logger = logging.getLogger("mloffload")
    if any(getattr(h, "_ml_offload", False) for h in logger.handlers):
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(path)
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler._ml_offload = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the host's stderr is not the user's business


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


class App:
    def __init__(self, nvim: Any) -> None:
        setup_logging(log_path())
        self.nvim = nvim
        self.bridge = Bridge(nvim)
        self.router = Router()
        self.sessions: dict[int, ChatSession] = {}
        self.model_lists: dict[int, list[str]] = {}

    def options(self) -> PluginOptions:
        return PluginOptions.from_lua(self.bridge.lua("ml-offload.config", "get"))

    # --- generic request: event, worker thread, result on the loop ------------------------

    def _request(self, kind: str, model: str, work: Callable[[dict[str, Any]], Any],
                 done: Callable[[Any], None]) -> None:
        """``work(note)`` runs in a thread (it may set ``note["backend"]``); ``done`` on the
        loop with its result. Errors become one notification."""
        rid = next(_ids)
        self.bridge.event("started", {"id": rid, "kind": kind, "model": model})
        result: dict[str, Any] = {"backend": None}

        def finish(error: BaseException | None) -> None:
            if error is None:
                done(result["value"])
            else:
                self.bridge.notify(user_error(error), "error")
            self.bridge.event("finished", {
                "id": rid, "kind": kind, "model": model, "ok": error is None,
                "backend": result["backend"],
                "error": None if error is None else user_error(error)})

        def run() -> None:
            result["value"] = work(result)
            self.bridge.later(finish, None)

        self.bridge.spawn(kind, run, finish)

    # --- :MLChat ----------------------------------------------------------------------

    def chat_command(self, args: Sequence[str], rng: Sequence[int],
                     ev: Mapping[str, Any] | None) -> None:
        prompt = " ".join(args).strip()
        context, filetype = "", ""
        if range_given(ev) and len(rng) == 2:
            first, last = int(rng[0]), int(rng[1])
            context = "\n".join(self.nvim.current.buffer[first - 1:last])
            filetype = str((ev or {}).get("ft") or "")
        if not prompt:
            question = "MLChat (about the selection): " if context else "MLChat: "
            self.bridge.lua("ml-offload", "ask", question, "chat",
                            {"context": context, "filetype": filetype})
            return
        self.open_chat(prompt, context, filetype)

    def open_chat(self, prompt: str, context: str = "", filetype: str = "") -> None:
        opts = self.options()
        content = user_message(prompt, context, filetype)
        keys = opts.chat_keys
        handle = self.bridge.lua(FLOAT, "open_tracked", {
            "lines": turn_lines(content), "title": [opts.model, "connecting…"],
            "filetype": "markdown",
        }, [[keys.get("followup", ""), "followup", "ask a follow-up"],
            [keys.get("cancel", ""), "cancel", "cancel the answer"],
            [keys.get("close", ""), "close", "close"]])
        buf = int(handle["buf"])
        session = ChatSession(self.bridge, self.router, opts, buf)
        self.sessions[buf] = session
        session.ask(content, opts, first_turn=True)

    def followup(self, buf: int, prompt: str) -> None:
        session = self.sessions.get(buf)
        if session is None or session.closed:
            return
        if session.busy:
            self.bridge.notify("an answer is still streaming: wait, or cancel it with "
                               f"{self.options().chat_keys.get('cancel') or 'the cancel key'}",
                               "warn")
            return
        session.ask(prompt.strip(), self.options(), first_turn=False)

    # --- :MLStatus ----------------------------------------------------------------------

    def status_command(self) -> None:
        opts = self.options()
        handle = self.bridge.lua(FLOAT, "open_tracked", {
            "lines": ["# ml-offload status", "", f"checking {opts.api_url} …"],
            "title": ["status"], "filetype": "markdown"}, [["q", "close", "close"]])
        buf = int(handle["buf"])

        def work(note: dict[str, Any]) -> list[str]:
            client = self.router.client(opts)
            note["backend"] = "server"
            try:
                health = client.probe()
            except ServerUnreachable as exc:
                note["backend"] = None
                from ..hardware.gpu import GPUProbe

                vram = GPUProbe().snapshot().to_dict()
                fb = self._fallback_facts(opts) if opts.fallback else None
                return status_lines(opts.api_url, None, None, vram, exc.reason, fb)
            return status_lines(opts.api_url, health, client.get("/status"),
                                client.get("/vram"))

        def show(lines: list[str]) -> None:
            self.bridge.lua(FLOAT, "set_lines", buf, 0, -1, lines)

        self._request("status", opts.model, work, show)

    def _fallback_facts(self, opts: PluginOptions) -> dict[str, Any]:
        fallback = self.router.fallback(opts)
        facts = fallback.describe()
        if not facts["loaded"]:
            ready = fallback.readiness()
            facts["plan"] = ready.get("plan") or ready.get("fix") or ready.get("model")
        return facts

    # --- :MLEmbed -----------------------------------------------------------------------

    def embed_command(self, args: Sequence[str], rng: Sequence[int]) -> None:
        text = " ".join(args).strip()
        if not text and len(rng) == 2:
            text = "\n".join(self.nvim.current.buffer[int(rng[0]) - 1:int(rng[1])])
        if not text.strip():
            self.bridge.notify("nothing to embed: select some text first", "warn")
            return
        opts = self.options()

        def work(note: dict[str, Any]) -> tuple[list[float], str]:
            route = self.router.route(opts)
            if not route.is_fallback:
                try:
                    note["backend"] = "server"
                    return self.router.client(opts).embed(text, opts.model), opts.model
                except ServerUnreachable as exc:
                    self.router.use_fallback(opts, exc)
            note["backend"] = "fallback"
            vector, model = self.router.fallback(opts).embed(text)
            return vector, f"{model}, {FALLBACK_LABEL.strip('()')}"

        def done(out: tuple[list[float], str]) -> None:
            vector, model = out
            if opts.embed_register:
                self.nvim.call("setreg", opts.embed_register, json.dumps(vector))
            self.bridge.notify(f"embedding: {len(vector)} dimensions ({model})")

        self._request("embed", opts.model, work, done)

    # --- :MLModels ----------------------------------------------------------------------

    def models_command(self) -> None:
        opts = self.options()

        def work(note: dict[str, Any]) -> tuple[list[dict[str, Any]], str, bool]:
            route = self.router.route(opts)
            if not route.is_fallback:
                try:
                    note["backend"] = "server"
                    return self.router.client(opts).models(), route.backend, False
                except ServerUnreachable as exc:
                    route = self.router.use_fallback(opts, exc)
            note["backend"] = "fallback"
            return self.router.fallback(opts).models(), route.backend, True

        def show(out: tuple[list[dict[str, Any]], str, bool]) -> None:
            cards, backend, local = out
            where = f"local registry {FALLBACK_LABEL}" if local else opts.api_url
            lines, ids = models_lines(cards, opts.fallback_model if local else opts.model,
                                      where)
            handle = self.bridge.lua(FLOAT, "open_tracked", {
                "lines": lines, "title": ["models", backend], "filetype": "markdown"},
                [["<CR>", "select_model", "use this model"], ["q", "close", "close"]])
            self.model_lists[int(handle["buf"])] = ids

        self._request("models", opts.model, work, show)

    def select_model(self, buf: int, line: int) -> None:
        ids = self.model_lists.get(buf) or []
        index = line - 1 - MODELS_HEADER
        if not 0 <= index < len(ids):
            return
        model = ids[index]
        self.bridge.lua("ml-offload", "set_model", model)
        self.bridge.lua(FLOAT, "close_buf", buf)
        self.bridge.notify(f"model set to {model} for later requests")

    # --- actions from the Lua layer (MLOffloadCall) ------------------------------------------

    def call(self, action: str, payload: Mapping[str, Any]) -> None:
        buf = int(payload.get("buf") or 0)
        if action == "chat":
            self.open_chat(str(payload.get("prompt") or ""), str(payload.get("context") or ""),
                           str(payload.get("filetype") or ""))
        elif action == "followup":
            self.followup(buf, str(payload.get("prompt") or ""))
        elif action == "cancel":
            session = self.sessions.get(buf)
            if session is None or not session.cancel():
                self.bridge.notify("nothing to cancel", "info")
        elif action == "select_model":
            self.select_model(buf, int(payload.get("line") or 0))
        elif action == "closed":
            session = self.sessions.pop(buf, None)
            if session is not None:
                session.closed = True
                session.cancel()
            self.model_lists.pop(buf, None)
        else:
            self.bridge.notify(f"unknown action {action!r}", "error")

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
        server: dict[str, Any] = {"url": opts.api_url, "ok": False}
        client = self.router.client(opts)
        try:
            server["health"] = client.probe()
            server["vram"] = client.get("/vram")
            server["ok"] = True
        except ClientError as exc:
            server["error"] = str(exc)
            server["unreachable"] = isinstance(exc, ServerUnreachable)
        facts["server"] = server
        fb: dict[str, Any] = {"enabled": opts.fallback, "model": opts.fallback_model}
        try:
            fallback = self.router.fallback(opts)
            fb.update(fallback.readiness())
            fb["state"] = fallback.describe()
        except Exception as exc:
            fb.update({"ok": False, "engine": user_error(exc)})
        facts["fallback"] = fb
        return facts

    def close(self) -> None:
        for session in self.sessions.values():
            session.closed = True
            session.cancel()
        self.router.close()
