"""``create_app()``: the FastAPI application, its state built in a lifespan (no module globals)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from .. import __version__
from ..config import Settings
from ..hardware.gpu import GPUProbe
from ..models.catalog import open_registry
from ..models.registry import Registry
from .backend import Backend
from .docs import docs_page
from .errors import APIError, error_response, install_error_handlers
from .guard import Guard
from .mode import resolve_mode
from .ollama.errors import render_error
from .ollama.routes import router as ollama_router
from .routes import router
from .runner import Runtime
from .stats import Stats

log = logging.getLogger("mloffload.server")


class OpenAICORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with its rejected preflights in the OpenAI error shape."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        message = bytes(response.body).decode() or "CORS preflight rejected"
        error = APIError(response.status_code, message, code="cors_rejected")
        out = error_response(error)
        for key in ("vary",):
            if key in response.headers:
                out.headers[key] = response.headers[key]
        return out


def make_backend(settings: Settings, registry: Registry, gpu: GPUProbe, stats: Stats,
                 runtime: Runtime | None = None) -> Backend:
    """The backend ``settings`` name (see server/mode.py), behind a router to the remote
    upstreams when there are any. ``runtime`` replaces how models run (tests give an engine
    of their own; lifecycle, queue and routes stay the real ones)."""
    primary = _primary_backend(settings, registry, gpu, stats, runtime)
    if not settings.upstreams:
        return primary
    from .upstream.remote import Remote
    from .upstream.router import Router

    remotes = [Remote(u, settings, stats) for u in settings.upstreams]
    log.info("upstreams: %s", ", ".join(r.url for r in remotes))
    router: Backend = Router(primary, remotes, registry, settings, stats)
    return router


def _primary_backend(settings: Settings, registry: Registry, gpu: GPUProbe, stats: Stats,
                     runtime: Runtime | None) -> Backend:
    from .manager import ModelManager

    mode = resolve_mode(settings)
    log.info("mode: %s", mode.why)
    if runtime is None and mode.backend == "llama-server":
        from .upstream.backend import UpstreamBackend

        upstream: Backend = UpstreamBackend(settings, registry, stats, gpu)
        return upstream
    if runtime is None and mode.backend == "managed":
        from .engines.backend import ManagedBackend
        from .engines.runtime import EngineRuntime

        assert mode.binary is not None
        engines = EngineRuntime(settings, gpu, mode.binary, mode.found_in)
        manager = ModelManager(settings, registry, gpu, stats, engines)
        managed: Backend = ManagedBackend(settings, manager, stats)
        return managed
    from .local.backend import LocalBackend
    from .local.runtime import LocalRuntime

    runtime = runtime or LocalRuntime(settings, gpu)
    return LocalBackend(settings, ModelManager(settings, registry, gpu, stats, runtime), stats)


def create_app(settings: Settings, registry: Registry | None = None,
               runtime: Runtime | None = None, *, close_registry: bool = False) -> FastAPI:
    """Build the app. ``registry`` may be passed in (tests, or a caller that already scanned);
    ``runtime`` too (see make_backend). The registry is closed at shutdown when the app
    opened it or ``close_registry`` says so: uvicorn ends the process with the SIGTERM it
    caught right after the shutdown, so code after ``uvicorn.run`` never runs then."""
    gpu = GPUProbe()
    stats = Stats(gpu.snapshot)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reg = registry if registry is not None else open_registry(settings)
        backend = make_backend(settings, reg, gpu, stats, runtime)
        app.state.settings = settings
        app.state.registry = reg
        app.state.gpu = gpu
        app.state.stats = stats
        app.state.backend = backend
        app.state.started_at = time.time()
        await backend.startup()
        try:
            yield
        finally:
            await backend.shutdown()
            if registry is None or close_registry:
                reg.close()
                log.info("registry closed")

    app = FastAPI(
        title="ml-offload",
        version=__version__,
        summary="OpenAI-compatible API on llama.cpp, with GPU offload and model lifecycle",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI needs a CDN; docs.py renders a page with nothing to fetch
        redoc_url=None,
    )

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return docs_page(app.openapi())

    install_error_handlers(app, render_error)
    app.include_router(router)
    app.include_router(ollama_router)
    if settings.cors_origins:
        app.add_middleware(OpenAICORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Guard, settings=settings, stats=stats, render=render_error)
    return app
