"""The in-process backend: requests run on llama.cpp through the model manager.

Each kind of request (chat and completions, fill in the middle, tokens, embeddings) is a
short method here over one ``Job``: the worker-thread handoff, the cancel and time rules,
and the counting they share. The lifecycle and facts are ``server/lifecycle.py``'s, shared
with managed mode.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ...engine.base import (
    FINISH_CANCELLED,
    Cancelled,
    ContextLengthError,
    Embeddings,
    Engine,
    EngineError,
    FimUnsupported,
    GenerationResult,
    InvalidTokens,
)
from ...engine.fim import InfillResult
from ...logs import log_unexpected
from ...models.registry import file_changed
from ..backend import (
    ClientGone,
    access,
    unless_disconnected,
)
from ..errors import APIError, error_body
from ..fim import (
    FIM_UNSUPPORTED,
    InfillAnswer,
    completion_as_infill,
    fim_entry,
    fim_request_model,
)
from ..lifecycle import ManagerBackend
from ..manager import Lease, parse_keep_alive
from ..responses import SSE_HEADERS, json_response
from ..schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    InfillRequest,
    TokenizeRequest,
    embedding_list,
)
from ..sse import DONE, ChunkTemplate, event
from ..stats import Outcome
from .pipe import TokenPipe, pump
from .runtime import LocalRunner

log = logging.getLogger("mloffload.server")

def engine_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), code="context_length_exceeded", param=exc.param)
    if isinstance(exc, InvalidTokens):
        return APIError(400, str(exc), code="invalid_value", param=exc.param)
    if isinstance(exc, FimUnsupported):
        return APIError(400, str(exc), code=FIM_UNSUPPORTED, param="model")
    if isinstance(exc, EngineError):
        return APIError(500, f"Generation failed: {exc}", code="engine_error")
    log_unexpected(log, "engine failure", exc)
    return APIError(500, f"Generation failed ({type(exc).__name__}); the server keeps serving.",
                    code="internal_error")


def runner_of(lease: Lease) -> LocalRunner:
    runner = lease.model.runner
    assert isinstance(runner, LocalRunner)
    return runner


class Job:
    """One request's work on a model's worker thread, and its bookkeeping.

    The work runs to its end on the thread even when the request gives up on it (the
    client leaves, the time runs out): that sets ``cancel``, which the engine checks
    between tokens, batches and inputs. The slot is given back and the request counted
    once, when the thread is done with it, so the next request never waits behind work
    it cannot see.
    """

    def __init__(self, backend: LocalBackend, lease: Lease, started: float,
                 result: GenerationResult | None = None) -> None:
        self.backend = backend
        self.lease = lease
        self.started = started
        self.cancel = threading.Event()
        self.result = result if result is not None else GenerationResult()
        self.disconnected = False
        self.timed_out = False
        self.loop = asyncio.get_running_loop()
        # Measured from the slot, not from arrival: the wait in the queue is the lease's.
        self._timer = self.loop.call_later(backend.settings.request_timeout, self._on_timeout)
        backend.stats.begin()

    def _on_timeout(self) -> None:
        self.timed_out = True
        self.cancel.set()

    def client_left(self) -> None:
        self.disconnected = True
        self.cancel.set()

    def timeout_error(self) -> APIError:
        return APIError(504, f"The request ran longer than "
                        f"{self.backend.settings.request_timeout:g}s and was stopped.",
                        code="request_timeout")

    def run(self, fn: Callable[[], Any]) -> Awaitable[Any]:
        """Start ``fn`` on the model's thread; the awaitable may be cancelled, the work
        itself is not (see the class)."""
        worker = self.loop.run_in_executor(runner_of(self.lease).executor, fn)
        worker.add_done_callback(self._done)
        return asyncio.shield(worker)

    def _done(self, worker: asyncio.Future[Any]) -> None:
        self._timer.cancel()
        outcome = Outcome.FAILED
        try:
            outcome = self._outcome(worker)
            self.lease.release()
        except Exception as exc:  # bookkeeping must never leave a request counted active
            log_unexpected(log, "ending a request", exc)
        finally:
            r = self.result
            self.backend.stats.end(outcome, r.prompt_tokens, r.completion_tokens)

    def _outcome(self, worker: asyncio.Future[Any]) -> Outcome:
        error = None if worker.cancelled() else worker.exception()
        if error is None and not worker.cancelled() and isinstance(worker.result(),
                                                                   BaseException):
            error = worker.result()
        stopped = isinstance(error, Cancelled) or self.result.finish_reason in (
            None, FINISH_CANCELLED)
        if self.disconnected and stopped:
            return Outcome.CANCELLED
        if error is not None or self.timed_out:
            return Outcome.FAILED
        return Outcome.COMPLETED


class LocalBackend(ManagerBackend):
    name = "llamacpp"
    READY = "llama.cpp in-process is ready; loaded: {}"
    IDLE = "llama.cpp in-process is ready; models load on demand"

    # --- admission --------------------------------------------------------------------

    async def _lease(self, request: Request, model: str, keep_alive: Any) -> Lease:
        ka = parse_keep_alive(keep_alive)
        try:
            lease = await unless_disconnected(request, self.manager.acquire(model, ka))
            access(request).queue_ms = round(lease.waited * 1000, 1)
            if file_changed(lease.model.entry):
                raise self._retire(lease)
            return lease
        except APIError as exc:
            self.stats.record(Outcome.REJECTED if exc.status == 429 else Outcome.FAILED)
            raise
        except ClientGone:
            self.stats.record(Outcome.CANCELLED)
            raise

    def _retire(self, lease: Lease) -> APIError:
        """The model's file changed on disk while this request waited for it: touching its
        mapped weights could kill the server (SIGBUS on a truncated file). The manager
        unloads it once its queue is served; the next request loads the file again."""
        entry = lease.model.entry
        lease.keep_alive = 0
        lease.release()
        return APIError(503, f"The file of model {entry.id!r} changed on disk while it was "
                        f"loaded ({entry.path}); it is unloaded, and the next request loads "
                        "it again.", code="model_file_changed", headers={"Retry-After": "1"})

    # --- generation -----------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        _refuse_format(req)
        messages = req.message_dicts()
        params = req.sampling(self.settings)
        if log.isEnabledFor(logging.DEBUG):  # prompt text is logged at debug level only
            log.debug("chat model=%s params=%s messages=%r", req.model, params, messages)

        def start(job: Job) -> Callable[[], Iterator[str]]:
            engine = runner_of(job.lease).engine
            return lambda: engine.chat(messages, params, job.result, job.cancel)

        return await self._generate(request, req, start, chat=True)

    async def completion(self, req: CompletionRequest, request: Request) -> Response:
        _refuse_format(req)
        prompt = req.prompt_text
        params = req.sampling(self.settings)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("completion model=%s params=%s prompt=%r suffix=%r", req.model, params,
                      prompt, req.suffix)
        if req.suffix is not None:  # fill in the middle: the /infill layout, no extras
            entry = fim_entry(fim_request_model(req.model, self.settings), self.manager.resolve)
            infill = completion_as_infill(req, self.settings)
            inp, fim_params, result = infill.infill_input(), infill.sampling(self.settings), \
                InfillResult()

            def start_fim(job: Job) -> Callable[[], Iterator[str]]:
                engine = runner_of(job.lease).engine
                return lambda: engine.infill(inp, fim_params, result, job.cancel)

            return await self._generate(request, req, start_fim, chat=False, model=entry.id,
                                        result=result)

        def start(job: Job) -> Callable[[], Iterator[str]]:
            engine = runner_of(job.lease).engine
            return lambda: engine.complete(prompt, params, job.result, job.cancel)

        return await self._generate(request, req, start, chat=False)

    async def _start(self, request: Request, model: str, keep_alive: Any,
                     start: Callable[[Job], Callable[[], Iterator[str]]],
                     result: GenerationResult | None = None) -> tuple[Job, TokenPipe]:
        """Lease the model, start the generation on its worker thread, and wait for the
        prompt stage (its errors come back as API errors)."""
        t0 = time.monotonic()
        lease = await self._lease(request, model, keep_alive)
        job = Job(self, lease, t0, result)
        pipe = TokenPipe(job.loop)
        starter = start(job)
        job.run(lambda: pump(starter, pipe))
        try:
            await unless_disconnected(request, pipe.started())
        except (ClientGone, asyncio.CancelledError):
            job.client_left()
            raise
        except BaseException as exc:
            raise engine_api_error(exc) from None
        return job, pipe

    async def _collect(self, request: Request, job: Job, pipe: TokenPipe) -> str:
        """A non-streamed answer's whole text, once generation is over."""
        try:
            text = await unless_disconnected(request, pipe.collect())
        except (ClientGone, asyncio.CancelledError):
            job.client_left()
            raise
        except BaseException as exc:
            raise engine_api_error(exc) from None
        if job.timed_out:
            raise job.timeout_error()
        access(request).tokens(job.result.prompt_tokens, job.result.completion_tokens)
        return text

    async def _generate(
        self,
        request: Request,
        req: ChatCompletionRequest | CompletionRequest,
        start: Callable[[Job], Callable[[], Iterator[str]]],
        *,
        chat: bool,
        model: str | None = None,
        result: GenerationResult | None = None,
    ) -> Response:
        job, pipe = await self._start(request, model or req.model, req.keep_alive, start,
                                      result)
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if req.stream:
            tpl = ChunkTemplate(obj="chat.completion.chunk" if chat else "text_completion",
                                cid=cid, created=created, model=req.model, chat=chat,
                                include_usage=req.include_usage)
            route = "/v1/chat/completions" if chat else "/v1/completions"
            return StreamingResponse(self._sse(job, pipe, tpl, route, request),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        text = await self._collect(request, job, pipe)
        r = job.result
        finish = r.finish_reason or "stop"
        usage = {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                 "total_tokens": r.prompt_tokens + r.completion_tokens}
        if chat:
            body: dict[str, Any] = {
                "id": cid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish}],
                "usage": usage, "system_fingerprint": None,
            }
        else:
            if isinstance(req, CompletionRequest) and req.echo:
                text = req.prompt_text + text
            body = {
                "id": cid, "object": "text_completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": finish}],
                "usage": usage,
            }
        return json_response(body)

    async def _sse(self, job: Job, pipe: TokenPipe, tpl: ChunkTemplate, route: str,
                   request: Request) -> AsyncIterator[bytes]:
        finished = False
        # The role event goes out with the first text: an extra write (and the client's
        # wake-up) in the middle of prompt processing measurably delays the first token.
        pending = tpl.role() if tpl.chat else b""
        try:
            first = True
            while True:
                try:
                    text = await pipe.next_batch()
                except BaseException as exc:
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    yield pending + event(engine_api_error(exc).body())
                    yield DONE
                    finished = True
                    return
                if text is None:
                    break
                if first:
                    self.stats.ttft.labels(route).observe(time.monotonic() - job.started)
                    first = False
                    yield pending + tpl.text(text)
                    pending = b""
                    continue
                yield tpl.text(text)
            if pending:
                yield pending
            r = job.result
            access(request).tokens(r.prompt_tokens, r.completion_tokens)
            if job.timed_out:
                err = job.timeout_error()
                yield event(error_body(err.message, err.type, err.param, err.code))
            else:
                yield tpl.finish(r.finish_reason or "stop")
            if tpl.include_usage:
                yield tpl.usage(r.prompt_tokens, r.completion_tokens)
            yield DONE
            finished = True
        finally:
            if not finished:
                job.client_left()

    # --- fill in the middle ------------------------------------------------------------------

    async def infill(self, req: InfillRequest, request: Request) -> Response:
        entry = fim_entry(fim_request_model(req.model, self.settings), self.manager.resolve)
        params = req.sampling(self.settings)
        inp = req.infill_input()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("infill model=%s params=%s input=%r", entry.id, params, inp)
        result = InfillResult()
        answer = InfillAnswer(req, params, inp.samplers, req.model or entry.id, result)

        def start(job: Job) -> Callable[[], Iterator[str]]:
            engine = runner_of(job.lease).engine
            return lambda: engine.infill(inp, params, result, job.cancel)

        job, pipe = await self._start(request, entry.id, req.keep_alive, start, result)
        if req.stream:
            return StreamingResponse(self._infill_sse(job, pipe, answer, request),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        await self._collect(request, job, pipe)
        return Response(answer.final(), media_type="application/json")

    async def _infill_sse(self, job: Job, pipe: TokenPipe, answer: InfillAnswer,
                          request: Request) -> AsyncIterator[bytes]:
        """llama-server's stream: one event per piece, then the final answer; no [DONE]."""
        finished = False
        try:
            while True:
                try:
                    text = await pipe.next_batch()
                except BaseException as exc:
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    yield event(engine_api_error(exc).body())
                    finished = True
                    return
                if text is None:
                    break
                yield answer.partial(text)
            r = job.result
            access(request).tokens(r.prompt_tokens, r.completion_tokens)
            if job.timed_out:
                err = job.timeout_error()
                yield event(error_body(err.message, err.type, err.param, err.code))
            else:
                yield b"data: " + answer.final() + b"\n\n"
            finished = True
        finally:
            if not finished:
                job.client_left()

    async def tokenize(self, req: TokenizeRequest, request: Request) -> Response:
        def work(engine: Engine) -> dict[str, Any]:
            content = req.content
            parts = [content] if isinstance(content, str) else content
            ids: list[int] = []
            for i, part in enumerate(parts):
                ids += engine.tokenize(part, req.add_special and i == 0, req.parse_special) \
                    if isinstance(part, str) else [int(part)]
            if not req.with_pieces:
                return {"tokens": ids}
            out = []
            for tok in ids:
                raw = engine.piece(tok)
                try:
                    piece: str | list[int] = raw.decode("utf-8")
                except UnicodeDecodeError:
                    piece = list(raw)
                out.append({"id": tok, "piece": piece})
            return {"tokens": out}

        return json_response(await self._on_engine(request, req.model, work))

    async def detokenize(self, req: DetokenizeRequest, request: Request) -> Response:
        def work(engine: Engine) -> dict[str, Any]:
            return {"content": engine.detokenize(req.tokens)}

        return json_response(await self._on_engine(request, req.model, work))

    async def _on_engine(self, request: Request, model: str,
                         work: Callable[[Engine], dict[str, Any]]) -> dict[str, Any]:
        """Run a quick job on the model's worker thread (no generation, no request count)."""
        lease = await self._lease(request, model, None)
        try:
            runner = runner_of(lease)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(runner.executor, work, runner.engine)
        except EngineError as exc:
            raise APIError(400, str(exc), code="invalid_value",
                           param=getattr(exc, "param", None)) from None
        finally:
            lease.release()

    # --- embeddings -------------------------------------------------------------------------

    async def embeddings(self, req: EmbeddingRequest, request: Request) -> Response:
        inputs = req.inputs
        lease = await self._lease(request, req.model, req.keep_alive)
        info = lease.model.entry.info
        n_embd = info.embedding_length if info else 0
        if req.dimensions is not None and req.dimensions != n_embd:
            lease.release()
            self.stats.record(Outcome.FAILED)
            raise APIError(400, f"This model's embeddings have {n_embd} dimensions; "
                           f"'dimensions' = {req.dimensions} is not supported.",
                           param="dimensions", code="invalid_value")
        job = Job(self, lease, time.monotonic())
        engine = runner_of(lease).engine

        def work() -> Embeddings | BaseException:
            try:
                out = engine.embed(inputs, job.cancel)
            except BaseException as exc:  # handed back to the event loop as a value
                return exc
            job.result.prompt_tokens = out.prompt_tokens
            return out

        try:
            out = await unless_disconnected(request, job.run(work))
        except (ClientGone, asyncio.CancelledError):
            job.client_left()
            raise
        if job.timed_out:
            raise job.timeout_error()
        if isinstance(out, BaseException):
            raise engine_api_error(out)
        access(request).tokens(out.prompt_tokens, 0)
        return json_response(embedding_list(out.vectors, req.model, out.prompt_tokens,
                                            req.encoding_format))

    # --- facts ---------------------------------------------------------------------------

    def _engine_problem(self) -> str:
        facts = self.manager.facts
        return "" if facts.get("available") else str(facts.get("reason"))

    def status(self) -> dict[str, Any]:
        return {"loaded_models": self.manager.status(), "loading": self.manager.loading()}

    def engine_pids(self) -> dict[int, dict[str, Any]]:
        models = list(self.manager.loaded.values())
        if not models:
            return {}
        return {os.getpid(): {"model": ",".join(m.id for m in models),
                              "planned_gpu_bytes": sum(m.plan.gpu_bytes for m in models)}}


def _refuse_format(req: ChatCompletionRequest | CompletionRequest) -> None:
    if req.wants_format:
        raise APIError(400, "The in-process llama.cpp backend cannot constrain its output to "
                       "JSON ('response_format'); the llama-server and managed backends can.",
                       param="response_format", code="unsupported_response_format")
