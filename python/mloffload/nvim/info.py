""":MLStatus, :MLModels and :MLEmbed: one request each, in a worker thread, shown in an
information float (or a notification). An error always leaves the float saying what
happened and what to do; nothing stays on "checking…"."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from .actions import Call, Handler
from .client import ClientError, ServerError, ServerUnreachable, served_facts
from .errors import user_error
from .options import PluginOptions
from .services import Services
from .views import MODELS_HEADER, error_lines, models_lines, status_lines


class Info:
    def __init__(self, services: Services) -> None:
        self.s = services
        self.model_lists: dict[int, list[str]] = {}

    def actions(self) -> Mapping[str, Handler]:
        return {"status": self.status, "models": self.models, "embed": self.embed,
                "select_model": self.select_model, "float_closed": self.float_closed}

    def _request(self, kind: str, opts: PluginOptions, work: Callable[[dict[str, Any]], Any],
                 done: Callable[[Any], None],
                 failed: Callable[[str], None] | None = None) -> None:
        """``work(note)`` runs in a thread (it may set ``note["backend"]``); ``done`` on the
        loop with its result. An error is one notification, and ``failed(message)``."""
        ticket = self.s.requests.start(kind, opts.model)
        note: dict[str, Any] = {"backend": None}

        def finish(error: BaseException | None) -> None:
            message = None if error is None else user_error(error)
            if message is None:
                done(note["value"])
            else:
                self.s.bridge.notify(message, "error")
                if failed is not None:
                    failed(message)
            self.s.requests.finish(ticket, ok=error is None, backend=note["backend"],
                                   error=message)

        def run() -> None:
            note["value"] = work(note)
            self.s.bridge.later(finish, None)

        self.s.bridge.spawn(kind, run, finish)

    # --- :MLStatus ----------------------------------------------------------------------

    def status(self, call: Call) -> None:
        opts = call.opts
        window = self.s.lua.float_open("status", ["# ml-offload status", "",
                                                   f"checking {opts.api_url} …"], [])

        def work(note: dict[str, Any]) -> list[str]:
            client = self.s.router.client(opts)
            note["backend"] = "server"
            try:
                health = client.probe()
            except ServerUnreachable as exc:
                note["backend"] = None
                from ..hardware.gpu import GPUProbe

                vram = GPUProbe().snapshot().to_dict()
                fb = self._fallback_facts(opts) if opts.fallback else None
                return status_lines(opts.api_url, None, None, vram, exc.reason, fb)
            except ServerError as exc:
                return error_lines(opts.api_url, str(exc))
            return status_lines(opts.api_url, health, client.get("/status"),
                                client.get("/vram"))

        def show(lines: list[str]) -> None:
            self.s.lua.float_set_lines(window.buf, 0, -1, lines)

        self._request("status", opts, work, show,
                      lambda message: show(error_lines(opts.api_url, message)))

    def _fallback_facts(self, opts: PluginOptions) -> dict[str, Any]:
        fallback = self.s.router.fallback(opts)
        facts = fallback.describe()
        if not facts["loaded"]:
            ready = fallback.readiness()
            facts["plan"] = ready.get("plan") or ready.get("fix") or ready.get("model")
        return facts

    # --- :MLEmbed -----------------------------------------------------------------------

    def embed(self, call: Call) -> None:
        text = call.text("args").strip()
        selection = call.table("selection") or {}
        if not text:
            text = str(selection.get("text") or "")
        if not text.strip():
            where = ("the selection is empty" if call.number("range") else
                     "the current line is empty")
            self.s.bridge.notify(f"nothing to embed: {where} (:MLEmbed {{text}} embeds text)",
                                 "warn")
            return
        opts = call.opts

        def work(note: dict[str, Any]) -> tuple[list[float], str]:
            route = self.s.router.route(opts)
            if not route.is_fallback:
                try:
                    note["backend"] = "server"
                    return self.s.router.client(opts).embed(text, opts.model), opts.model
                except ServerUnreachable as exc:
                    self.s.router.use_fallback(opts, exc)
            note["backend"] = "fallback"
            vector, model = self.s.router.fallback(opts).embed(text)
            return vector, f"{model}, local fallback"

        def done(out: tuple[list[float], str]) -> None:
            vector, model = out
            if opts.embed_register:
                self.s.bridge.nvim.call("setreg", opts.embed_register, json.dumps(vector))
            self.s.bridge.notify(f"embedding: {len(vector)} dimensions ({model})")

        self._request("embed", opts, work, done)

    # --- :MLModels ----------------------------------------------------------------------

    def models(self, call: Call) -> None:
        opts = call.opts

        def work(note: dict[str, Any]) -> tuple[list[dict[str, Any]], str, bool,
                                                 dict[str, int | None]]:
            route = self.s.router.route(opts)
            if not route.is_fallback:
                try:
                    note["backend"] = "server"
                    client = self.s.router.client(opts)
                    cards = client.models()
                    try:
                        info = client.backend_info()
                    except ClientError:
                        info = {}
                    n_ctx = {str(c.get("id")): served_facts(str(c.get("id")), cards, info).n_ctx
                             for c in cards}
                    return cards, route.backend, False, n_ctx
                except ServerUnreachable as exc:
                    route = self.s.router.use_fallback(opts, exc)
            note["backend"] = "fallback"
            fallback = self.s.router.fallback(opts)
            cards = fallback.models()
            ctx = fallback.settings().n_ctx
            n_ctx = {str(c.get("id")): served_facts(str(c.get("id")), cards,
                                                    {"settings": {"n_ctx": ctx}}).n_ctx
                     for c in cards}
            return cards, route.backend, True, n_ctx

        def show(out: tuple[list[dict[str, Any]], str, bool, dict[str, int | None]]) -> None:
            cards, backend, local, n_ctx = out
            where = "local registry, server unreachable" if local else opts.api_url
            lines, ids, cursor = models_lines(cards, opts.fallback_model if local else
                                              opts.model, where, n_ctx)
            window = self.s.lua.float_open("models", lines, [backend], cursor)
            self.model_lists[window.buf] = ids

        def failed(message: str) -> None:
            self.s.lua.float_open("models", [f"# Models ({opts.api_url})", "",
                                             f"error: {message}"], ["error"])

        self._request("models", opts, work, show, failed)

    def select_model(self, call: Call) -> None:
        buf = call.number("buf")
        ids = self.model_lists.get(buf) or []
        index = call.number("line") - 1 - MODELS_HEADER
        if not 0 <= index < len(ids):
            return
        model = ids[index]
        self.s.lua.set_model(model)
        self.s.lua.float_close(buf)
        self.s.bridge.notify(f"model set to {model} for later requests")

    def float_closed(self, call: Call) -> None:
        self.model_lists.pop(call.number("buf"), None)
