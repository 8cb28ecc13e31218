"""Ollama's endpoints. Handlers stay thin: ``translate`` makes the OpenAI request, the backend
(any backend, through its protocol) answers it, ``stream`` and ``catalog`` shape the reply."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from ..backend import Backend, access
from ..errors import APIError
from ..manager import parse_keep_alive
from ..schemas import ChatCompletionRequest, CompletionRequest
from . import catalog, translate
from .schemas import ChatRequest, EmbeddingsRequest, EmbedRequest, GenerateRequest, ShowRequest
from .stream import Fold, NDJSONResponse, fold_answer, json_body
from .times import ns, rfc3339

# The Ollama release whose API (its docs/api.md) this follows; our own version is in GET /.
OLLAMA_API_VERSION = "0.9.0"
ENDPOINTS = [
    "GET /api/version", "GET /api/tags", "POST /api/show", "GET /api/ps", "POST /api/chat",
    "POST /api/generate", "POST /api/embed", "POST /api/embeddings",
]


class OllamaRoute(APIRoute):
    """Ollama's clients, and the curl lines in its docs (``-d`` sends a form content type),
    send JSON under any Content-Type: read every body as JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            scope = request.scope
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope["headers"] = [*headers, (b"content-type", b"application/json")]
            return await handler(Request(scope, request.receive))

        return route


router = APIRouter(route_class=OllamaRoute, tags=["ollama"])
Field = Literal["message", "response"]


def _json(data: Any, stream: bool = False) -> Response:
    if stream:  # one line of a stream that has only one
        return Response(orjson.dumps(data) + b"\n", media_type="application/x-ndjson")
    return Response(orjson.dumps(data), media_type="application/json")


def _backend(request: Request) -> Backend:
    backend: Backend = request.app.state.backend
    return backend


def _loaded(backend: Backend) -> list[dict[str, Any]]:
    loaded: list[dict[str, Any]] = backend.status().get("loaded_models") or []
    return loaded


def _load_seconds(backend: Backend, before: set[str]) -> float:
    """How long loading took, for a model this request had to load."""
    return sum(float(m.get("load_seconds") or 0) for m in _loaded(backend)
               if m.get("id") not in before)


async def _cards(backend: Backend) -> list[dict[str, Any]]:
    cards: list[dict[str, Any]] = (await backend.models())["data"]
    return cards


# --- models ----------------------------------------------------------------------------


@router.get("/api/version", summary="Ollama: the API version served")
async def version() -> Response:
    return _json({"version": OLLAMA_API_VERSION})


@router.get("/api/tags", summary="Ollama: the models (ids and aliases)")
async def tags(request: Request) -> Response:
    return _json(catalog.tags(await _cards(_backend(request))))


@router.post("/api/show", summary="Ollama: one model's details, GGUF metadata, capabilities")
async def show(req: ShowRequest, request: Request) -> Response:
    card = catalog.find(await _cards(_backend(request)), req.model)
    return _json(catalog.show(card, request.app.state.registry.get(card["id"])))


@router.get("/api/ps", summary="Ollama: the loaded models, their memory and expiry")
async def ps(request: Request) -> Response:
    backend = _backend(request)
    return _json(catalog.ps(_loaded(backend), await _cards(backend)))


# --- generation ------------------------------------------------------------------------


async def _load(backend: Backend, name: str, keep_alive: float | None = None) -> str:
    """Load ``name`` now; its id. llama-server keeps its own model loaded and refuses loads
    (``unsupported_backend``): there the model only has to be one it serves."""
    try:
        return str((await backend.load(name, keep_alive))["id"])
    except APIError as exc:
        if exc.code != "unsupported_backend":
            raise
    return str(catalog.find(await _cards(backend), name)["id"])


async def _lifecycle(request: Request, req: ChatRequest | GenerateRequest | EmbedRequest
                     | EmbeddingsRequest) -> str:
    """Nothing to answer: load the model, or with keep_alive 0 unload it; says which."""
    backend = _backend(request)
    name = translate.model_name(req.model)
    keep_alive = parse_keep_alive(req.keep_alive)
    if keep_alive != 0:
        await _load(backend, name, keep_alive)
        return "load"
    try:
        await backend.unload(name)
    except APIError as exc:
        if exc.code != "model_busy":
            raise
        await backend.load(name, 0.0)  # busy: it goes as soon as its requests end
    return "unload"


async def _check_context(backend: Backend, name: str, num_ctx: int) -> None:
    """num_ctx is honoured up to the context the model is loaded with, never truncated."""
    model_id = await _load(backend, name)  # what it really runs with: loaded, if it was not
    n_ctx = next((m.get("n_ctx") for m in _loaded(backend) if m.get("id") == model_id), None)
    if isinstance(n_ctx, int) and num_ctx > n_ctx:
        raise APIError(400, f"options.num_ctx = {num_ctx} is more than the {n_ctx} tokens of "
                       f"context {name!r} is loaded with here; send at most {n_ctx}, or start "
                       "the server with a larger --n-ctx.", param="options.num_ctx",
                       code="num_ctx_too_large")


async def _answer(request: Request, req: ChatRequest | GenerateRequest,
                  oreq: ChatCompletionRequest | CompletionRequest, field: Field,
                  started: float) -> Response:
    backend = _backend(request)
    before = {str(m.get("id")) for m in _loaded(backend)}
    if req.options is not None and req.options.num_ctx is not None:
        await _check_context(backend, oreq.model, req.options.num_ctx)
    fold = Fold(req.model, field, started, stream=req.stream)
    if isinstance(oreq, ChatCompletionRequest):
        answer = await backend.chat(oreq, request)
    else:
        answer = await backend.completion(oreq, request)
    fold.load_seconds = _load_seconds(backend, before)
    if req.stream:
        return NDJSONResponse(answer, fold)
    return _json(await fold_answer(answer, request, fold))


def _done(req: ChatRequest | GenerateRequest, field: Field, reason: str) -> Response:
    empty: Any = {"role": "assistant", "content": ""} if field == "message" else ""
    return _json({"model": req.model, "created_at": rfc3339(), field: empty, "done": True,
                  "done_reason": reason}, req.stream)


@router.post("/api/chat", summary="Ollama: chat (NDJSON stream unless \"stream\": false)")
async def chat(req: ChatRequest, request: Request) -> Response:
    started = time.monotonic()
    access(request).model = req.model
    if not req.messages:
        return _done(req, "message", await _lifecycle(request, req))
    return await _answer(request, req, translate.chat(req), "message", started)


@router.post("/api/generate", summary="Ollama: complete a prompt (NDJSON stream by default)")
async def generate(req: GenerateRequest, request: Request) -> Response:
    started = time.monotonic()
    access(request).model = req.model
    if not req.prompt and not req.suffix:
        return _done(req, "response", await _lifecycle(request, req))
    return await _answer(request, req, translate.generate(req), "response", started)


async def _vectors(request: Request, req: EmbedRequest | EmbeddingsRequest
                   ) -> tuple[list[Any], int, float]:
    """(vectors in input order, prompt tokens, load seconds) from the backend."""
    backend = _backend(request)
    before = {str(m.get("id")) for m in _loaded(backend)}
    answer = await backend.embeddings(translate.embeddings(req), request)
    data = await json_body(answer, request)
    items = sorted(data.get("data") or [], key=lambda d: int(d.get("index", 0)))
    tokens = int((data.get("usage") or {}).get("prompt_tokens") or 0)
    return [d.get("embedding") for d in items], tokens, _load_seconds(backend, before)


@router.post("/api/embed", summary="Ollama: embeddings for a string or a list")
async def embed(req: EmbedRequest, request: Request) -> Response:
    started = time.monotonic()
    access(request).model = req.model
    if not req.input:
        await _lifecycle(request, req)
        return _json({"model": req.model, "embeddings": []})
    vectors, tokens, load = await _vectors(request, req)
    return _json({"model": req.model, "embeddings": vectors,
                  "total_duration": ns(time.monotonic() - started),
                  "load_duration": ns(load), "prompt_eval_count": tokens})


@router.post("/api/embeddings", summary="Ollama (legacy): one embedding for 'prompt'")
async def embeddings(req: EmbeddingsRequest, request: Request) -> Response:
    access(request).model = req.model
    if not req.prompt:
        await _lifecycle(request, req)
        return _json({"embedding": []})
    vectors, _, _ = await _vectors(request, req)
    return _json({"embedding": vectors[0] if vectors else []})


# --- what this server does not do ------------------------------------------------------

_MODELS_HERE = ("its models are the GGUF files in models_dir (ML_OFFLOAD_MODELS_DIR), and "
                "GET /api/tags lists them.")
_REFUSED = {
    ("POST", "/api/pull"): "ml-offload does not download models: put the .gguf file in "
    "models_dir and restart the server; " + _MODELS_HERE,
    ("POST", "/api/push"): "ml-offload does not upload models; " + _MODELS_HERE,
    ("POST", "/api/create"): "ml-offload does not build models from Modelfiles (default_model "
    "and the registry's aliases name them); " + _MODELS_HERE,
    ("POST", "/api/copy"): "ml-offload does not copy models; " + _MODELS_HERE,
    ("DELETE", "/api/delete"): "ml-offload does not delete model files (remove the .gguf "
    "yourself); " + _MODELS_HERE,
    ("POST", "/api/blobs/{digest}"): "ml-offload keeps no blob store; " + _MODELS_HERE,
    ("HEAD", "/api/blobs/{digest}"): "ml-offload keeps no blob store; " + _MODELS_HERE,
}


def _refusal(message: str) -> Callable[[], Awaitable[Response]]:
    async def refuse() -> Response:
        raise APIError(400, message, code="not_supported_here")

    return refuse


for (_method, _path), _message in _REFUSED.items():
    router.add_api_route(_path, _refusal(_message), methods=[_method],
                         summary=f"Ollama: refused ({_message.split(':')[0].split(';')[0]})",
                         include_in_schema=_method != "HEAD")


@router.head("/", include_in_schema=False)
async def heartbeat() -> Response:
    """The ``ollama`` command line checks that a server is up with ``HEAD /``."""
    return Response()
