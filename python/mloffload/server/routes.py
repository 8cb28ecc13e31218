"""HTTP routes. Handlers stay thin: the backend does the work, ``app.state`` holds the parts."""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from .. import __version__
from .backend import Backend, HealthState, access
from .errors import error_body, model_not_found
from .ollama.routes import ENDPOINTS as OLLAMA_ENDPOINTS
from .responses import json_response
from .schemas import (
    ERROR_RESPONSES,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingList,
    EmbeddingRequest,
    InfillRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)

router = APIRouter()


class LlamaServerRoute(APIRoute):
    """llama-server's own endpoints read the body as JSON whatever its Content-Type says
    (``curl -d`` sends a form type); so do ours."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
            request.scope["headers"] = [*headers, (b"content-type", b"application/json")]
            return await handler(request)

        return route


llama_router = APIRouter(route_class=LlamaServerRoute)

ENDPOINTS = [
    "GET /", "GET /health", "GET /api/health", "GET /api/backend/info", "GET /v1/models",
    "GET /v1/models/{model}", "POST /v1/chat/completions", "POST /v1/completions",
    "POST /v1/embeddings", "GET /vram", "GET /status", "GET /metrics",
    "POST /api/models/{model}/load", "POST /api/models/{model}/unload", "POST /infill",
    "POST /tokenize", "POST /detokenize", "GET /openapi.json",
]
_SSE_DOC = {"text/event-stream": {"schema": {"type": "string"},
                                  "description": "with \"stream\": true"}}


def backend_of(request: Request) -> Backend:
    backend: Backend = request.app.state.backend
    return backend


@router.get("/", summary="What this server is")
async def root(request: Request) -> Response:
    return json_response({
        "name": "ml-offload",
        "version": __version__,
        "backend": backend_of(request).name,
        "endpoints": ENDPOINTS + OLLAMA_ENDPOINTS,
        "docs": "/docs",
    })


@router.get("/health", summary="Readiness: 200 when ready, 503 with the reason otherwise",
            responses={503: ERROR_RESPONSES[503]})
async def health(request: Request) -> Response:
    health = await backend_of(request).health()
    if health.ready:
        return json_response({"status": "ok"})
    loading = health.state is HealthState.LOADING
    body = error_body(health.reason, "service_unavailable_error", None,
                      "model_loading" if loading else "backend_unavailable")
    body["status"] = health.state.value
    return json_response(body, status=503)


@router.get("/api/health", summary="Health of each backend (the seed's shape)")
async def api_health(request: Request) -> Response:
    backend = backend_of(request)
    health = await backend.health()
    status = "healthy" if health.ready else (
        "loading" if health.detail.get("available") else "unhealthy")
    if health.ready and not all(u["ready"] for u in health.upstreams.values()):
        status = "degraded"  # we serve; some upstream's models do not answer now
    return json_response({"status": status, "backend": backend.name,
                          "backends": {"llamacpp": health.detail, **health.upstreams}})


@router.get("/api/backend/info", summary="Engine facts and default/loaded model details")
async def backend_info(request: Request) -> Response:
    return json_response(await backend_of(request).info())


@router.get("/v1/models", summary="Models in the registry", responses={200: {"model": ModelList}})
async def list_models(request: Request) -> Response:
    return json_response(await backend_of(request).models())


@router.get("/v1/models/{model:path}", summary="One model",
            responses={200: {"model": ModelCard}, 404: ERROR_RESPONSES[404]})
async def get_model(model: str, request: Request) -> Response:
    listing = await backend_of(request).models()
    for card in listing["data"]:
        if card["id"] == model or model in (card.get("meta") or {}).get("aliases", []):
            return json_response(card)
    raise model_not_found(model)


@router.post("/v1/chat/completions", summary="Chat completion (stream with \"stream\": true)",
             responses={200: {"model": ChatCompletion, "content": _SSE_DOC}, **ERROR_RESPONSES})
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
    access(request).model = req.model
    return await backend_of(request).chat(req, request)


@router.post("/v1/completions", summary="Text completion (stream with \"stream\": true)",
             responses={200: {"model": Completion, "content": _SSE_DOC}, **ERROR_RESPONSES})
async def completions(req: CompletionRequest, request: Request) -> Response:
    access(request).model = req.model
    return await backend_of(request).completion(req, request)


@router.post("/v1/embeddings", summary="Embeddings: one mean-pooled vector per input",
             responses={200: {"model": EmbeddingList}, **ERROR_RESPONSES})
async def embeddings(req: EmbeddingRequest, request: Request) -> Response:
    access(request).model = req.model
    return await backend_of(request).embeddings(req, request)


@llama_router.post("/infill", summary="Fill in the middle (code completion), as llama-server's "
                   "/infill", responses={200: {"content": {
                       "application/json": {"schema": {"type": "object"}}, **_SSE_DOC}},
                       **ERROR_RESPONSES})
async def infill(req: InfillRequest, request: Request) -> Response:
    access(request).model = req.model
    return await backend_of(request).infill(req, request)


@llama_router.post("/tokenize", summary="Tokenize text, as llama-server's /tokenize",
                   responses=ERROR_RESPONSES)
async def tokenize(req: TokenizeRequest, request: Request) -> Response:
    return await backend_of(request).tokenize(req, request)


@llama_router.post("/detokenize", summary="Token ids back to text, as llama-server's "
                   "/detokenize", responses=ERROR_RESPONSES)
async def detokenize(req: DetokenizeRequest, request: Request) -> Response:
    return await backend_of(request).detokenize(req, request)


router.include_router(llama_router)


@router.get("/vram", summary="GPU memory: total, used, free (GB) and per-GPU detail")
async def vram(request: Request) -> Response:
    snap = request.app.state.gpu.snapshot()
    out = snap.to_dict()
    # Each engine's own VRAM (NVML's per-process accounting) next to the planner's figure.
    engines = []
    for pid, facts in backend_of(request).engine_pids().items():
        used = [p.used_bytes for g in snap.gpus for p in g.processes if p.pid == pid]
        engines.append({"pid": pid, **facts,
                        "vram_bytes": sum(u for u in used if u is not None) if used else None})
    out["engines"] = engines
    return json_response(out)


@router.get("/status", summary="Uptime, loaded models, request counters, GPU summary")
async def status(request: Request) -> Response:
    state = request.app.state
    backend = backend_of(request)
    snap = state.gpu.snapshot().to_dict()
    gpu: dict[str, Any] = {k: v for k, v in snap.items() if k != "gpus"}
    gpu["gpus"] = [{k: g[k] for k in ("index", "name", "total_gb", "used_gb", "free_gb")}
                   for g in snap.get("gpus", [])]
    return json_response({
        "version": __version__,
        "uptime_seconds": round(time.time() - state.started_at, 1),
        "backend": backend.name,
        **backend.status(),
        "requests": state.stats.status(),
        "gpu": gpu,
    })


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    return Response(request.app.state.stats.exposition(),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


@router.post("/api/models/{model}/load", summary="Load a model now (and plan its offload)",
             responses={404: ERROR_RESPONSES[404], 503: ERROR_RESPONSES[503]})
async def load_model(model: str, request: Request) -> Response:
    return json_response(await backend_of(request).load(model))


@router.post("/api/models/{model}/unload", summary="Unload a model and free its memory",
             responses={404: ERROR_RESPONSES[404]})
async def unload_model(model: str, request: Request) -> Response:
    return json_response(await backend_of(request).unload(model))
