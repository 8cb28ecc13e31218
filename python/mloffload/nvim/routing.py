"""Server or in-process fallback: decided again for every request.

Each request first makes a cheap check (``/api/health`` with a short connect timeout). A
live server gets the request, and a fallback model still loaded is released. When nothing
answers and the fallback is on, the request runs in-process. An HTTP error from a live
server is the server's answer and is shown as such; it never triggers the fallback.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import TYPE_CHECKING

from .client import Client, ClientError, ModelFacts, ServerUnreachable
from .options import PluginOptions

if TYPE_CHECKING:
    from .fallback import Fallback

log = logging.getLogger("mloffload.nvim")

SERVER = "server"
FALLBACK = "fallback"
FALLBACK_LABEL = "(local fallback)"


class RouteError(ClientError):
    """Neither the server nor the fallback can take the request; the message says why."""


@dataclasses.dataclass(frozen=True)
class Route:
    kind: str  # SERVER or FALLBACK
    backend: str  # the server's backend name, or "llama.cpp (local fallback)"
    unreachable: str = ""  # why the server was not used

    @property
    def is_fallback(self) -> bool:
        return self.kind == FALLBACK


class Router:
    """Holds the HTTP client and the fallback, rebuilt when their options change."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client: Client | None = None
        self._client_key: tuple[object, ...] = ()
        self._fallback: Fallback | None = None
        self._fallback_key: tuple[object, ...] = ()

    def client(self, opts: PluginOptions) -> Client:
        key = (opts.api_url, opts.timeout, opts.api_key)
        with self._lock:
            if self._client is None or key != self._client_key:
                if self._client is not None:
                    self._client.close()
                self._client = Client(opts.api_url, timeout=opts.timeout, api_key=opts.api_key)
                self._client_key = key
            return self._client

    def fallback(self, opts: PluginOptions) -> Fallback:
        from .fallback import Fallback

        key = (opts.fallback_model, opts.fallback_keep_alive, opts.data_dir)
        with self._lock:
            if self._fallback is None or key != self._fallback_key:
                if self._fallback is not None:
                    self._fallback.close()
                self._fallback = Fallback(opts.fallback_model, opts.fallback_keep_alive,
                                          opts.data_dir)
                self._fallback_key = key
            return self._fallback

    def route(self, opts: PluginOptions) -> Route:
        """Where this request goes. Runs in a worker thread (it makes an HTTP request)."""
        try:
            health = self.client(opts).probe()
        except ServerUnreachable as exc:
            return self.use_fallback(opts, exc)
        self.release_fallback()
        return Route(SERVER, str(health.get("backend") or "server"))

    def use_fallback(self, opts: PluginOptions, exc: ServerUnreachable) -> Route:
        """The server cannot be reached: the in-process route, or a clear error."""
        if not opts.fallback:
            raise RouteError(f"{exc} (the in-process fallback is off: fallback = false)")
        from .fallback import FallbackUnavailable

        try:
            self.fallback(opts).check_installed()
        except FallbackUnavailable as why:
            raise RouteError(f"{exc}; and {why}") from None
        return Route(FALLBACK, f"llama.cpp {FALLBACK_LABEL}", unreachable=exc.reason)

    def facts(self, opts: PluginOptions, route: Route) -> ModelFacts:
        """The model that will answer on ``route``, and its context. Worker thread."""
        if route.is_fallback:
            return self.fallback(opts).facts()
        return self.client(opts).model_facts(opts.model)

    def release_fallback(self) -> None:
        fb = self._fallback
        if fb is not None and fb.loaded and fb.release("the server is reachable again"):
            log.info("the server is back: fallback model released")

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
            if self._fallback is not None:
                self._fallback.close()
            self._client = self._fallback = None
