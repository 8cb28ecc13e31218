"""The llama-server backend (``--backend llama-server``): proxy to a llama-server we do not run.

Faults come back in OpenAI's shape: llama-server's own errors keep their status; an
unreachable llama-server is a 503 ``backend_unavailable`` naming its URL; a stream cut
mid-way ends with an error event and ``[DONE]``. Nothing is cached that would outlive a
llama-server restart for long: the next request after it comes back just works.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ...config import Settings
from ...hardware.gpu import GPUProbe
from ...models.registry import Registry
from ..backend import Health, HealthState
from ..errors import APIError, model_not_found
from ..fim import (
    InfillAsCompletion,
    as_fim_error,
    completion_as_infill,
    fim_request_model,
    infill_body,
)
from ..schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    InfillRequest,
    TokenizeRequest,
)
from ..stats import Outcome, Stats
from .admission import Admission
from .catalog import UpstreamModel, fetch_catalog
from .client import UpstreamClient
from .probe import probe, props_summary
from .relay import (
    LLAMA_END,
    OPENAI_END,
    AnyRequest,
    Forwarder,
    Reshape,
    StreamEnd,
    post_plain,
    request_body,
)
from .supervisor import LlamaServerSupervisor

log = logging.getLogger("mloffload.server")

CATALOG_TTL = 60.0  # seconds a fetched /v1/models stays fresh (a miss refetches at once)


class UpstreamBackend:
    name = "llama-server"

    def __init__(self, settings: Settings, registry: Registry, stats: Stats,
                 gpu: GPUProbe | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.stats = stats
        self.url = settings.llamacpp_url.rstrip("/")
        self.supervisor: LlamaServerSupervisor | None = None
        if settings.llama_server_bin is not None:
            self.supervisor = LlamaServerSupervisor(settings, registry, gpu or GPUProbe())
        hint = " (it is restarting)" if self.supervisor is not None else \
            "; start it, or point ML_OFFLOAD_LLAMACPP_URL at it"
        label = f"llama-server at {self.url}"
        self.client = UpstreamClient(self.url, settings.llamacpp_api_key, label=label,
                                     request_timeout=settings.request_timeout,
                                     pool_timeout=settings.load_timeout, hint=hint)
        self.client.on_broken = self._forget_catalog  # it may come back with another model
        self.forwarder = Forwarder(self.client, stats, settings)
        self.admission = Admission(label, settings.max_queue)
        self._catalog: list[UpstreamModel] | None = None
        self._catalog_at = 0.0
        self._catalog_lock = asyncio.Lock()
        self._last_health: dict[str, Any] = {
            "available": False, "ready": False, "details": "not checked yet", "checked_at": None}
        self._loading = False

    def _forget_catalog(self) -> None:
        self._catalog = None

    async def startup(self) -> None:
        # httpx logs every request at INFO; our access log already has one line per request.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        self.client.start()
        if self.supervisor is not None:
            await self.supervisor.start()
        health = await self.health()
        if health.ready:
            log.info("llama-server at %s is ready", self.url)
            try:  # /health needs no key; the model list does: say now if ours is wrong
                await self.catalog(refresh=True)
            except APIError as exc:
                if exc.code != "upstream_auth_failed":  # that one the client has logged
                    log.warning("%s", exc.message)
        else:
            log.warning("llama-server at %s is not ready yet: %s", self.url, health.reason)

    async def shutdown(self) -> None:
        if self.supervisor is not None:
            await self.supervisor.stop()
        await self.client.close()

    # --- models ---------------------------------------------------------------------------

    async def catalog(self, refresh: bool = False) -> list[UpstreamModel]:
        def fresh() -> bool:
            return self._catalog is not None and time.monotonic() - self._catalog_at < CATALOG_TTL

        if not refresh and fresh():
            assert self._catalog is not None
            return self._catalog
        async with self._catalog_lock:
            if not refresh and fresh():
                assert self._catalog is not None
                return self._catalog
            catalog, slots = await fetch_catalog(self.client, self.registry)
            if slots:
                self.admission.slots = slots
            self._catalog, self._catalog_at = catalog, time.monotonic()
            return catalog

    async def resolve(self, name: str) -> UpstreamModel:
        """A model name (ours, an alias, or llama-server's id) to the upstream model."""
        for refresh in (False, True):
            for m in await self.catalog(refresh=refresh):
                if name in m.names:
                    return m
        raise model_not_found(name)

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [m.card() for m in await self.catalog(refresh=True)]}

    async def load(self, name: str, keep_alive: float | None = None) -> dict[str, Any]:
        raise APIError(400, "Loading and unloading are managed by llama-server in this mode.",
                       code="unsupported_backend")

    unload = load

    # --- requests -------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        return await self._forward("/v1/chat/completions", req, request)

    async def completion(self, req: CompletionRequest, request: Request) -> Response:
        if req.suffix is None:
            return await self._forward("/v1/completions", req, request)
        # llama-server ignores a suffix there: its /infill answers, translated.
        infill = completion_as_infill(req, self.settings)
        return await self._fim(fim_request_model(req.model, self.settings), infill, request,
                               "/v1/completions", InfillAsCompletion(req), OPENAI_END)

    async def infill(self, req: InfillRequest, request: Request) -> Response:
        name = fim_request_model(req.model, self.settings)
        return await self._fim(name, req, request, "/infill", None, LLAMA_END,
                               requested=req.model)

    async def _fim(self, name: str, req: InfillRequest, request: Request, route: str,
                   reshape: Reshape | None, end: StreamEnd, requested: str | None = None
                   ) -> Response:
        try:
            target = await self.resolve(name)
            body = infill_body(req, target.upstream_id, self.settings)
            turn = self.admission.take()
        except APIError as exc:
            self.stats.record(Outcome.REJECTED if exc.status in (429, 503) else Outcome.FAILED)
            raise
        try:
            return await self.forwarder.forward("/infill", body, requested or target.id,
                                                req.stream, request, turn, route,
                                                reshape=reshape, end=end)
        except APIError as exc:
            raise as_fim_error(exc, target.id) from None

    async def tokenize(self, req: TokenizeRequest, request: Request) -> Response:
        return await self._plain("/tokenize", req.model, req.model_dump(), request)

    async def detokenize(self, req: DetokenizeRequest, request: Request) -> Response:
        return await self._plain("/detokenize", req.model, req.model_dump(), request)

    async def _plain(self, path: str, model: str, data: dict[str, Any], request: Request
                     ) -> Response:
        target = await self.resolve(model)
        return await post_plain(self.client, path, {**data, "model": target.upstream_id},
                                request)

    async def embeddings(self, req: EmbeddingRequest, request: Request) -> Response:
        return await self._forward("/v1/embeddings", req, request)

    async def _forward(self, path: str, req: AnyRequest, request: Request) -> Response:
        if log.isEnabledFor(logging.DEBUG):  # prompt text is logged at debug level only
            log.debug("%s model=%s body=%r", path, req.model, req.model_dump(exclude_unset=True))
        try:
            target = await self.resolve(req.model)
            if isinstance(req, EmbeddingRequest):
                check_dimensions(req, target.n_embd)
            body = request_body(req, target.upstream_id, self.settings)
            turn = self.admission.take()
        except APIError as exc:
            self.stats.record(Outcome.REJECTED if exc.status in (429, 503) else Outcome.FAILED)
            raise
        stream = not isinstance(req, EmbeddingRequest) and req.stream
        return await self.forwarder.forward(path, body, req.model, stream, request, turn, path)

    # --- facts ----------------------------------------------------------------------------

    async def health(self) -> Health:
        health = await probe(self.client, self._catalog is None, self._refresh_quietly,
                             self.supervisor.describe() if self.supervisor else "")
        self._last_health = {**health.detail, "checked_at": time.time()}
        self._loading = health.state is HealthState.LOADING
        return health

    async def _refresh_quietly(self) -> None:
        with contextlib.suppress(APIError):
            await self.catalog(refresh=True)

    async def info(self) -> dict[str, Any]:
        health = await self.health()
        upstream: dict[str, Any] = {"url": self.url, **health.detail}
        models: list[dict[str, Any]] = []
        if health.detail["available"]:
            upstream.update(await props_summary(self.client))
            with contextlib.suppress(APIError):
                models = [m.meta() for m in await self.catalog(refresh=True)]
        return {
            "backend": self.name,
            "upstream": upstream,
            "default_model": models[0] if models else None,
            "models": models,
            "supervisor": self.supervisor.status() if self.supervisor is not None else None,
            "settings": {
                "llamacpp_url": self.url,
                "request_timeout_seconds": self.settings.request_timeout,
                "llama_server_bin": str(self.settings.llama_server_bin)
                if self.settings.llama_server_bin else None,
            },
        }

    def status(self) -> dict[str, Any]:
        loaded = [{"id": m.id, "upstream_id": m.upstream_id, "path": m.path,
                   "n_ctx": m.upstream_meta.get("n_ctx")} for m in self._catalog or []]
        a = self.admission
        out: dict[str, Any] = {
            "loaded_models": loaded,
            "loading": [m["id"] for m in loaded] if self._loading else [],
            "upstream": {"url": self.url, **self._last_health, "slots": a.slots,
                         "in_flight": a.in_flight, "waiting": a.waiting,
                         "max_queue": self.settings.max_queue},
        }
        if self.supervisor is not None:
            out["supervisor"] = self.supervisor.status()
        return out


    def engine_pids(self) -> dict[int, dict[str, Any]]:
        sup = self.supervisor
        if sup is None or not sup.running or sup.proc is None:
            return {}
        plan = sup.plan
        return {sup.proc.pid: {"model": sup.model_id,
                               "planned_gpu_bytes": plan.gpu_bytes if plan else None}}


def check_dimensions(req: EmbeddingRequest, n_embd: int | None) -> None:
    if req.dimensions is not None and n_embd is not None and req.dimensions != n_embd:
        raise APIError(400, f"This model's embeddings have {n_embd} dimensions; "
                       f"'dimensions' = {req.dimensions} is not supported.",
                       param="dimensions", code="invalid_value")
