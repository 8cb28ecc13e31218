"""Managed mode: each model in its own llama-server process, requests relayed to it.

The model manager owns the lifecycle as for the in-process backend (load on demand, one
load for concurrent first requests, keep-alive, LRU swap, ``max_queue`` past the busy
slots); the engine's ``--parallel`` slots decode requests together. Requests are relayed
with the proxy's relay. An engine that dies costs only the requests on it: each ends at once
with 502 ``engine_crashed`` (or that error event and ``[DONE]`` in a stream) naming the
signal or exit status and the end of the engine's log; the next request starts a new one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
from starlette.requests import Request
from starlette.responses import Response

from ...config import Settings
from ..backend import (
    ClientGone,
    access,
    unless_disconnected,
)
from ..errors import APIError
from ..fim import (
    InfillAsCompletion,
    as_fim_error,
    check_token_ids,
    completion_as_infill,
    fim_entry,
    fim_request_model,
    infill_body,
)
from ..lifecycle import ManagerBackend
from ..manager import Lease, ModelManager, OnWait, Ticket, parse_keep_alive
from ..queued import QueuedStream
from ..responses import json_response
from ..schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    InfillRequest,
    TokenizeRequest,
    embedding_list,
)
from ..stats import Outcome, Stats
from ..upstream.backend import check_dimensions
from ..upstream.relay import (
    LLAMA_END,
    OPENAI_END,
    Forwarder,
    Reshape,
    StreamEnd,
    post_plain,
    request_body,
)
from .process import EngineProcess
from .runtime import EngineRuntime

log = logging.getLogger("mloffload.server")


@dataclasses.dataclass(frozen=True)
class Outgoing:
    """One request relayed to a model's engine."""

    path: str  # on the engine
    route: str  # ours, for the metrics
    model: str  # the registry name whose engine answers
    requested: str  # the model name the answer carries
    stream: bool
    keep_alive: str | float | None
    body: Callable[[str], bytes]  # the engine's model id → the request body
    reshape: Reshape | None = None
    end: StreamEnd = OPENAI_END
    fim: bool = False  # the engine's "infill not supported" becomes our 400


class LeaseTurn:
    """A request's slot on an engine, given back when its answer ends."""

    __slots__ = ("lease",)

    def __init__(self, lease: Lease) -> None:
        self.lease = lease

    def end(self, outcome: Outcome) -> None:
        self.lease.release()


def engine_of(lease: Lease) -> EngineProcess:
    runner = lease.model.runner
    assert isinstance(runner, EngineProcess)
    return runner


class ManagedBackend(ManagerBackend):
    name = "managed"
    LOADING = "loading model {} in its engine process"
    READY = "engine processes ready; loaded: {}"
    IDLE = "engine processes (llama-server) start on demand"

    def __init__(self, settings: Settings, manager: ModelManager, stats: Stats) -> None:
        super().__init__(settings, manager, stats)
        runtime = manager.runtime
        assert isinstance(runtime, EngineRuntime)
        self.runtime: EngineRuntime = runtime

    # --- requests -------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        return await self._relay(self._openai("/v1/chat/completions", req), request)

    async def completion(self, req: CompletionRequest, request: Request) -> Response:
        if req.suffix is None:
            return await self._relay(self._openai("/v1/completions", req), request)
        # llama-server refuses a suffix there: its /infill answers, translated.
        entry = fim_entry(fim_request_model(req.model, self.settings), self.manager.resolve)
        infill = completion_as_infill(req, self.settings)
        return await self._relay(Outgoing(
            "/infill", "/v1/completions", entry.id, req.model, req.stream, req.keep_alive,
            lambda mid: infill_body(infill, mid, self.settings),
            reshape=InfillAsCompletion(req), fim=True), request)

    def _openai(self, path: str, req: ChatCompletionRequest | CompletionRequest) -> Outgoing:
        return Outgoing(path, path, req.model, req.model, req.stream, req.keep_alive,
                        lambda mid: request_body(req, mid, self.settings))

    async def embeddings(self, req: EmbeddingRequest, request: Request) -> Response:
        """One input at a time, one embedding request per engine at a time: llama-server
        with several slots batches the inputs of a request together, and then one input's
        vector changes with its neighbours (cosine 0.987 seen here for the embedded Gemma);
        alone, each is what it is in-process. Between inputs a client that left, or a
        timeout, stops the work."""
        lease = await self._lease(request, req.model, parse_keep_alive(req.keep_alive))
        engine = engine_of(lease)
        outcome = Outcome.FAILED
        self.stats.begin()
        prompt_tokens = 0
        try:
            info = lease.model.entry.info
            check_dimensions(req, info.embedding_length if info else None)
            assert engine.client is not None
            vectors: list[list[float]] = []
            deadline = time.monotonic() + self.settings.request_timeout
            async with engine.embed_lock:
                for i, text in enumerate(req.inputs):
                    if time.monotonic() > deadline:
                        raise APIError(504, f"The request ran longer than "
                                       f"{self.settings.request_timeout:g}s and was stopped.",
                                       code="request_timeout")
                    vec, n = await unless_disconnected(
                        request, self._embed_one(engine, lease.model.id, text, i))
                    vectors.append(vec)
                    prompt_tokens += n
            outcome = Outcome.COMPLETED
        except ClientGone:
            outcome = Outcome.CANCELLED
            raise
        finally:
            lease.release()
            access(request).tokens(prompt_tokens, 0)
            self.stats.end(outcome, prompt_tokens)
        return json_response(embedding_list(vectors, req.model, prompt_tokens,
                                            req.encoding_format))

    async def _embed_one(self, engine: EngineProcess, model_id: str, text: str, index: int
                         ) -> tuple[list[float], int]:
        assert engine.client is not None
        body = orjson.dumps({"model": model_id, "input": text})
        try:
            resp = await engine.client.send("POST", "/v1/embeddings", body)
            content = await resp.aread()
            await resp.aclose()
        except (APIError, httpx.HTTPError) as exc:
            why = await engine.died()
            if why is not None:
                raise APIError(502, f"The engine of model {model_id!r} died while answering "
                               f"({why}); the next request starts a new one.",
                               code="engine_crashed") from None
            if isinstance(exc, APIError):
                raise
            raise engine.client.transport_error(exc) from None
        if resp.status_code != 200:
            error = engine.client.error(resp.status_code, content)
            if "too large to process" in error.message or "larger than the max context" \
                    in error.message:
                raise APIError(400, f"input[{index}] is too long for one embedding "
                               f"({error.message.removeprefix('llama-server: ')})",
                               param="input", code="context_length_exceeded")
            raise error
        data = orjson.loads(content)
        usage = data.get("usage") or {}
        return list(data["data"][0]["embedding"]), int(usage.get("prompt_tokens") or 0)

    async def _relay(self, out: Outgoing, request: Request) -> Response:
        if log.isEnabledFor(logging.DEBUG):  # prompt text is logged at debug level only
            log.debug("%s model=%s body=%r", out.path, out.model, out.body(out.model))
        ka = parse_keep_alive(out.keep_alive)
        if out.stream and self.manager.must_wait(out.model):
            # Queued behind busy slots: answer at once and say where it stands meanwhile.
            ticket = self._admit(out.model, ka)

            async def start(on_wait: OnWait) -> Response:
                lease = await self._granted(ticket.wait(on_wait))
                return await self._send(out, request, lease)

            return QueuedStream(start, ticket.abandon)
        lease = await self._lease(request, out.model, ka)
        return await self._send(out, request, lease)

    def _admit(self, model: str, keep_alive: float | None) -> Ticket:
        try:
            return self.manager.admit(model, keep_alive)
        except APIError as exc:
            self.stats.record(Outcome.REJECTED if exc.status == 429 else Outcome.FAILED)
            raise

    async def _granted(self, waiting: Awaitable[Lease]) -> Lease:
        try:
            lease: Lease = await waiting
        except APIError as exc:
            self.stats.record(Outcome.REJECTED if exc.status == 429 else Outcome.FAILED)
            raise
        except asyncio.CancelledError:
            self.stats.record(Outcome.CANCELLED)
            raise
        return lease

    async def _lease(self, request: Request, model: str, keep_alive: float | None) -> Lease:
        try:
            return await unless_disconnected(request, self.manager.acquire(model, keep_alive))
        except APIError as exc:
            self.stats.record(Outcome.REJECTED if exc.status == 429 else Outcome.FAILED)
            raise
        except ClientGone:
            self.stats.record(Outcome.CANCELLED)
            raise

    async def _send(self, out: Outgoing, request: Request, lease: Lease) -> Response:
        engine = engine_of(lease)
        assert engine.client is not None

        async def explain() -> APIError | None:
            why = await engine.died()
            if why is None:
                return None
            return APIError(502, f"The engine of model {lease.model.id!r} died while "
                            f"answering ({why}); the next request starts a new one.",
                            code="engine_crashed")

        forwarder = Forwarder(engine.client, self.stats, self.settings, explain)
        try:
            return await forwarder.forward(out.path, out.body(lease.model.id), out.requested,
                                           out.stream, request, LeaseTurn(lease), out.route,
                                           reshape=out.reshape, end=out.end)
        except APIError as exc:
            raise as_fim_error(exc, lease.model.id) if out.fim else exc from None

    # --- fill in the middle and tokens --------------------------------------------------------

    async def infill(self, req: InfillRequest, request: Request) -> Response:
        entry = fim_entry(fim_request_model(req.model, self.settings), self.manager.resolve)
        check_token_ids(entry, input_prefix=req.input_prefix, input_suffix=req.input_suffix)
        return await self._relay(Outgoing(
            "/infill", "/infill", entry.id, req.model or entry.id, req.stream, req.keep_alive,
            lambda mid: infill_body(req, mid, self.settings), end=LLAMA_END, fim=True),
            request)

    async def tokenize(self, req: TokenizeRequest, request: Request) -> Response:
        check_token_ids(self.manager.resolve(req.model), content=req.content)
        return await self._plain("/tokenize", req.model, req.model_dump(), request)

    async def detokenize(self, req: DetokenizeRequest, request: Request) -> Response:
        check_token_ids(self.manager.resolve(req.model), tokens=req.tokens)
        return await self._plain("/detokenize", req.model, req.model_dump(), request)

    async def _plain(self, path: str, model: str, data: dict[str, Any], request: Request
                     ) -> Response:
        """A quick request to the model's engine (no generation, no request count)."""
        lease = await self._lease(request, model, None)
        try:
            engine = engine_of(lease)
            assert engine.client is not None
            return await post_plain(engine.client, path, {**data, "model": lease.model.id},
                                    request)
        finally:
            lease.release()

    # --- models and facts -------------------------------------------------------------------

    def _info_extra(self) -> dict[str, Any]:
        return {"mode": {"name": "managed", "why": f"llama-server from {self.runtime.found_in}"}}

    def _settings_extra(self) -> dict[str, Any]:
        return {"parallel": self.settings.parallel}

    def status(self) -> dict[str, Any]:
        return {"loaded_models": self.manager.status(), "loading": self.manager.loading(),
                "engines": self.manager.engine_counts(), "checked_at": time.time()}

    def engine_pids(self) -> dict[int, dict[str, Any]]:
        """pid → the model it serves and the plan's GPU bytes (for /vram)."""
        out: dict[int, dict[str, Any]] = {}
        for m in self.manager.loaded.values():
            runner = m.runner
            if isinstance(runner, EngineProcess) and runner.alive and runner.pid:
                out[runner.pid] = {"model": m.id, "planned_gpu_bytes": m.plan.gpu_bytes}
        return out
