"""Ghost text through the remote plugin: completions when the server cannot be reached (the
in-process fallback model), or every completion with ``complete.transport = "python"``.

The Lua layer (``lua/ml-offload/complete``) builds the /infill request and normally sends it
itself; it hands the request here when its own connection is refused. A worker thread
routes it (server, else the fallback, which runs the same ``engine.infill`` as the server's
in-process backend) and streams the text back in batches through the Lua export
``complete_update``. ``complete_cancel`` stops it: the HTTP stream is cut, or the local
generation stops at the next token.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from ..engine.base import FimUnsupported, GenerationResult
from ..engine.fim import DEFAULT_SAMPLERS, InfillInput, InfillResult, sampler_names
from .actions import Call, Handler
from .client import ServerError
from .errors import user_error
from .services import Services
from .stream import Batcher

log = logging.getLogger("mloffload.nvim")

SAMPLING = ("temperature", "top_k", "top_p", "min_p", "seed", "repeat_penalty",
            "presence_penalty", "frequency_penalty", "stop")


def infill_input(body: Mapping[str, Any]) -> InfillInput:
    """The Lua layer's /infill body as the engine's input (the fields the fallback uses)."""
    extra = []
    for chunk in body.get("input_extra") or []:
        if isinstance(chunk, Mapping) and isinstance(chunk.get("text"), str):
            extra.append((str(chunk.get("filename") or "tmp"), chunk["text"]))
    samplers = body.get("samplers")
    return InfillInput(
        input_prefix=str(body.get("input_prefix") or ""),
        input_suffix=str(body.get("input_suffix") or ""),
        input_extra=tuple(extra),
        prompt=str(body.get("prompt") or ""),
        n_indent=max(0, int(body.get("n_indent") or 0)),
        t_max_predict_ms=int(body.get("t_max_predict_ms") or -1),
        samplers=DEFAULT_SAMPLERS if not isinstance(samplers, list | str)
        else sampler_names(samplers),
        cache_prompt=bool(body.get("cache_prompt", True)))


def sampling(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request's sampling fields in the OpenAI names the fallback takes."""
    out = {k: body[k] for k in SAMPLING if body.get(k) is not None}
    n = body.get("n_predict")
    if isinstance(n, int) and n >= 0:
        out["max_tokens"] = max(1, n)
    return out


def rate(result: GenerationResult) -> float:
    """Decode rate as llama-server reports it: the steps after the first token."""
    done, last = result.prompt_done_at, result.last_token_at
    steps = result.completion_tokens - 1
    if done is None or last is None or steps <= 0 or last <= done:
        return 0.0
    return round(steps / (last - done), 1)


class Completions:
    def __init__(self, services: Services) -> None:
        self.s = services
        self.running: dict[int, threading.Event] = {}

    def actions(self) -> Mapping[str, Handler]:
        return {"complete": self.start, "complete_cancel": self.cancel}

    def start(self, call: Call) -> None:
        rid = call.number("id")
        body = call.table("body") or {}
        for cancel in self.running.values():  # one completion at a time
            cancel.set()
        cancel = threading.Event()
        self.running[rid] = cancel
        opts = call.opts
        batcher = Batcher(self.s.bridge, lambda text: self._update(rid, {"text": text}))
        where = {"backend": "server"}

        def work() -> None:
            route = self.s.router.route(opts)
            where["backend"] = "fallback" if route.is_fallback else "server"
            if route.is_fallback:
                self.s.bridge.later(self._update, rid, {"backend": "fallback"})
                pieces, done = self._fallback(opts, body, cancel)
            else:
                pieces, done = self._server(opts, body, cancel)
            for piece in pieces:
                batcher.push(piece)
            batcher.push("", last=True)
            self.s.bridge.later(self._finish, rid, {"done": True, **done(),
                                                    "backend": where["backend"]})

        def failed(exc: BaseException) -> None:
            update: dict[str, Any] = {"error": user_error(exc), "backend": where["backend"]}
            if isinstance(exc, FimUnsupported):
                update["code"] = "fim_unsupported"
            elif isinstance(exc, ServerError) and exc.code:
                update["code"] = exc.code
                update["error"] = exc.server_message
            self._finish(rid, update)

        self.s.bridge.spawn("complete", work, failed)

    def _server(self, opts: Any, body: Mapping[str, Any], cancel: threading.Event
                ) -> tuple[Iterator[str], Any]:
        result = GenerationResult()
        final: dict[str, Any] = {}

        def pieces() -> Iterator[str]:
            final.update((yield from self.s.router.client(opts).infill(body, result, cancel)))

        def done() -> dict[str, Any]:
            tps = final.get("timings/predicted_per_second") or \
                (final.get("timings") or {}).get("predicted_per_second")
            return {"model": final.get("model"), "tps": tps}

        return pieces(), done

    def _fallback(self, opts: Any, body: Mapping[str, Any], cancel: threading.Event
                  ) -> tuple[Iterator[str], Any]:
        fallback = self.s.router.fallback(opts)
        result = InfillResult()
        pieces = fallback.infill(infill_input(body), sampling(body), result, cancel)

        def done() -> dict[str, Any]:
            return {"model": fallback.model_id, "tps": rate(result)}

        return pieces, done

    def _update(self, rid: int, update: dict[str, Any]) -> None:
        if rid in self.running:
            self.s.lua.complete_update(rid, update)

    def _finish(self, rid: int, update: dict[str, Any]) -> None:
        cancel = self.running.pop(rid, None)
        if cancel is not None and not cancel.is_set():
            self.s.lua.complete_update(rid, update)

    def cancel(self, call: Call) -> None:
        cancel = self.running.pop(call.number("id"), None)
        if cancel is not None:
            cancel.set()

    def close(self) -> None:
        for cancel in self.running.values():
            cancel.set()
        self.running.clear()

