"""The llama-server backend: proxy the OpenAI routes to llama.cpp's own C++ server.

One pooled httpx transport carries every upstream call: the lean HTTP/1.1 transport in
``http1`` for plain-http URLs, httpx's own for https. Requests go to the transport directly,
not through ``httpx.AsyncClient.send``: on a two-core machine the client layer (cookie
jar, auth and redirect hooks, none of which llama-server needs) and httpcore's per-read
cost were most of the proxy's CPU, and that CPU is taken from llama-server's decode
(bench/results/proxy.md). Streams are relayed as the
bytes arrive, cut only at SSE event boundaries; the one rewrite is the ``model`` field (the
name the client asked for instead of llama-server's file path), a byte replace. A client
that goes away closes the upstream stream, and llama-server stops generating.

Faults come back in OpenAI's shape: llama-server's own errors keep their status; an
unreachable llama-server is a 503 ``backend_unavailable`` naming its URL; a stream cut
mid-way ends with an error event and ``[DONE]``. Nothing is cached that would outlive a
llama-server restart for long: the next request after it comes back just works.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ... import __version__
from ...config import Settings
from ...hardware.gpu import GPUProbe
from ...models.registry import DEFAULT_ALIAS, ModelEntry, Registry
from ..backend import ClientGone, unless_disconnected
from ..errors import APIError, error_body, model_not_found
from ..schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from ..sse import DONE, event
from ..stats import Stats
from .http1 import HTTP1Transport
from .supervisor import LlamaServerSupervisor

log = logging.getLogger("mloffload.server")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
HEALTH_TIMEOUT = 3.0
CATALOG_TTL = 60.0  # seconds a fetched /v1/models stays fresh (a miss refetches at once)
MAX_PENDING = 1 << 20  # bytes held back waiting for an SSE event boundary

_MODEL_FIELD = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_PREDICTED_N = re.compile(rb'"predicted_n"\s*:\s*(\d+)')
_PROMPT_N = re.compile(rb'"prompt_n"\s*:\s*(\d+)')
_CACHE_N = re.compile(rb'"cache_n"\s*:\s*(\d+)')
_ERROR_EVENT = b'data: {"error"'
_DONE_MARK = b"data: [DONE]"
_CLOSE = {"Connection": "close"}
_HEADERS = {"Content-Type": "application/json", "Accept": "*/*",
            "Accept-Encoding": "identity", "User-Agent": f"ml-offload/{__version__}"}

# llama-server's error types (server-common.cpp) → our codes; others keep its type as code.
_UPSTREAM_CODES = {
    "exceed_context_size_error": "context_length_exceeded",
    "not_supported_error": "not_supported",
    "invalid_request_error": "invalid_request",
    "not_found_error": "not_found",
}


def _first_int(pattern: re.Pattern[bytes], data: bytes) -> int | None:
    m = pattern.search(data)
    return int(m.group(1)) if m else None


def token_counts(data: bytes) -> tuple[int, int]:
    """(prompt, completion) tokens from an answer's usage, or from llama-server's timings."""
    completion = _first_int(_COMPLETION_TOKENS, data)
    prompt = _first_int(_PROMPT_TOKENS, data)
    if completion is None and prompt is None:
        completion = _first_int(_PREDICTED_N, data)
        if (n := _first_int(_PROMPT_N, data)) is not None:
            prompt = n + (_first_int(_CACHE_N, data) or 0)
    return prompt or 0, completion or 0


class ModelRewrite:
    """Replace llama-server's ``"model": "<its id>"`` with the name the client sent."""

    __slots__ = ("new", "old")

    def __init__(self, requested: str) -> None:
        self.new = b'"model":' + orjson.dumps(requested)
        self.old: bytes | None = None

    def __call__(self, block: bytes) -> bytes:
        if self.old is None:
            m = _MODEL_FIELD.search(block)
            if m is None:
                return block
            self.old = m.group(0)
        if self.old == self.new:
            return block
        return block.replace(self.old, self.new)


def upstream_error(status: int, content: bytes, url: str, keyed: bool = False) -> APIError:
    """llama-server's error answer (or anything else it sent) as our OpenAI-shaped error."""
    message, utype = "", None
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        data = None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message") or "")
        utype = err.get("type") if isinstance(err.get("type"), str) else None
    elif isinstance(err, str):
        message = err
    if not message:
        text = content.decode("utf-8", "replace").strip()
        message = text[:300] or f"HTTP {status} with an empty body"
    if not 400 <= status <= 599:
        status = 502
    code = _UPSTREAM_CODES.get(utype or "", utype)
    headers: dict[str, str] = {}
    if status == 401:  # our key to llama-server, not the client's to us, is wrong
        said = "no API key was sent" if not keyed else "it refused the key we sent"
        return APIError(502, f"llama-server at {url} requires an API key and {said} "
                        f"({message}); set ML_OFFLOAD_LLAMACPP_API_KEY (or "
                        "llamacpp_api_key_file) to the key it was started with.",
                        code="upstream_auth_failed")
    if status == 503:
        code = "model_loading" if "loading" in message.lower() else "backend_unavailable"
        headers["Retry-After"] = "2"
    return APIError(status, f"llama-server: {message}", code=code, headers=headers)


class UpstreamModel:
    """One model llama-server serves, matched (by file path) to the registry when known."""

    def __init__(self, upstream_id: str, path: str | None, meta: dict[str, Any], created: int,
                 entry: ModelEntry | None, is_default: bool) -> None:
        self.upstream_id = upstream_id
        self.path = path
        self.upstream_meta = meta
        self.created = created
        self.entry = entry
        self.id = entry.id if entry is not None else upstream_id
        names = {self.id, upstream_id}
        if entry is not None:
            names.update(a for a in entry.aliases if a != DEFAULT_ALIAS)
        if is_default:
            names.add(DEFAULT_ALIAS)
        self.names = names

    @property
    def n_embd(self) -> int | None:
        n = self.upstream_meta.get("n_embd")
        if isinstance(n, int):
            return n
        info = self.entry.info if self.entry is not None else None
        return info.embedding_length if info else None

    def meta(self) -> dict[str, Any]:
        um = self.upstream_meta
        if self.entry is not None:
            meta = self.entry.summary()
        else:
            meta = {
                "id": self.id, "path": self.path, "usable": True, "reason": None,
                "source": "llama-server", "file_size": None, "architecture": None,
                "name": None, "size_label": None, "parameter_count": um.get("n_params"),
                "quantization": um.get("ftype"), "context_length": um.get("n_ctx_train"),
                "embedding_length": um.get("n_embd"), "block_count": None,
                "has_chat_template": None,
            }
        meta["aliases"] = sorted(self.names - {self.id})
        meta["loaded"] = True
        meta["upstream_id"] = self.upstream_id
        meta["upstream"] = um
        return meta

    def card(self) -> dict[str, Any]:
        return {"id": self.id, "object": "model", "created": self.created,
                "owned_by": "llama-server", "meta": self.meta()}


class Relay:
    """One streamed answer's upstream response and bookkeeping, closed exactly once."""

    __slots__ = ("backend", "closed", "outcome", "resp", "started", "tail")

    def __init__(self, backend: UpstreamBackend, resp: httpx.Response, started: float) -> None:
        self.backend = backend
        self.resp = resp
        self.started = started
        self.outcome = "cancelled"  # unless the stream reaches its end
        self.tail: collections.deque[bytes] = collections.deque(maxlen=3)  # for the usage
        self.closed = False

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with anyio.CancelScope(shield=True):
            await self.resp.aclose()
        prompt, completion = token_counts(b"".join(self.tail))
        self.backend.stats.end(self.outcome, prompt, completion)
        self.backend.end_turn(self.started, self.outcome == "completed")


class RelayResponse(StreamingResponse):
    """A stream that closes its upstream even when it is never iterated (a client that
    leaves between the answer's headers and its first byte), not only when it ends."""

    def __init__(self, content: AsyncIterator[bytes], relay: Relay) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.relay.close()


def _same_file(a: str | None, b: str) -> bool:
    if not a:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


class UpstreamBackend:
    name = "llama-server"

    def __init__(self, settings: Settings, registry: Registry, stats: Stats,
                 gpu: GPUProbe | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.stats = stats
        self.url = settings.llamacpp_url.rstrip("/")
        self._transport: httpx.AsyncBaseTransport | None = None
        self._catalog: list[UpstreamModel] | None = None
        self._catalog_at = 0.0
        self._catalog_lock = asyncio.Lock()
        self._last_health: dict[str, Any] = {
            "available": False, "ready": False, "details": "not checked yet", "checked_at": None}
        self._loading = False
        # Admission: llama-server's slots work, up to max_queue more requests wait in it;
        # past that, 429 as the in-process backend does. Slots come from its /props.
        self._slots = 1
        self._in_flight = 0
        self._job_seconds = 1.0  # moving average of a request's time, for Retry-After
        # Set while llama-server refuses our key: its /health is open, so it looks ready.
        self._auth_error: str | None = None
        self._urls: dict[str, httpx.URL] = {}
        self._timeout: dict[str, float | None] = {}
        headers = dict(_HEADERS)
        if settings.llamacpp_api_key:
            headers["Authorization"] = f"Bearer {settings.llamacpp_api_key}"
        self._headers = httpx.Headers(headers)
        self._close_headers = httpx.Headers({**headers, **_CLOSE})
        self.supervisor: LlamaServerSupervisor | None = None
        if settings.llama_server_bin is not None:
            self.supervisor = LlamaServerSupervisor(settings, registry, gpu or GPUProbe())

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def transport(self) -> httpx.AsyncBaseTransport:
        if self._transport is None:
            raise APIError(503, "The llama-server backend is shutting down.",
                           code="backend_unavailable")
        return self._transport

    async def startup(self) -> None:
        s = self.settings
        # httpx logs every request at INFO; our access log already has one line per request.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        timeout = httpx.Timeout(connect=5.0, read=s.request_timeout, write=30.0,
                                pool=s.load_timeout)
        self._timeout = timeout.as_dict()
        # llama-server closes idle connections after 5 s: drop ours a little earlier.
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=64,
                              keepalive_expiry=4.0)
        # Plain http (the usual loopback llama-server) goes through our lean transport;
        # https keeps httpx's own. No environment proxy ever sees loopback traffic.
        self._transport = HTTP1Transport(limits) if self.url.startswith("http://") else \
            httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
        if self.supervisor is not None:
            await self.supervisor.start()
        ready, reason, _ = await self.health()
        if ready:
            log.info("llama-server at %s is ready", self.url)
            try:  # /health needs no key; the model list does: say now if ours is wrong
                await self.catalog(refresh=True)
            except APIError as exc:
                if exc.code != "upstream_auth_failed":  # that one _note has logged
                    log.warning("%s", exc.message)
        else:
            log.warning("llama-server at %s is not ready yet: %s", self.url, reason)

    async def shutdown(self) -> None:
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self._transport is not None:
            transport, self._transport = self._transport, None
            await transport.aclose()

    # --- talking to llama-server -----------------------------------------------------------

    def _unreachable(self, exc: BaseException) -> APIError:
        self._catalog = None  # it may come back with another model
        detail = str(exc) or type(exc).__name__
        hint = " (it is restarting)" if self.supervisor is not None else \
            "; start it, or point ML_OFFLOAD_LLAMACPP_URL at it"
        return APIError(503, f"llama-server at {self.url} is not reachable ({detail}){hint}.",
                        code="backend_unavailable", headers={"Retry-After": "5"})

    def _transport_error(self, exc: httpx.HTTPError) -> APIError:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return self._unreachable(exc)
        if isinstance(exc, httpx.PoolTimeout):
            return APIError(503, f"Too many requests are waiting for llama-server at {self.url}.",
                            code="backend_busy", headers={"Retry-After": "5"})
        if isinstance(exc, httpx.TimeoutException):
            return APIError(504, f"llama-server at {self.url} did not answer in time "
                            f"({type(exc).__name__}).", code="upstream_timeout")
        self._catalog = None
        return APIError(502, f"The connection to llama-server at {self.url} failed: "
                        f"{exc or type(exc).__name__}.", code="upstream_error")

    async def _send(self, method: str, path: str, body: bytes | None = None,
                    timeout: float | None = None, last: bool = False) -> httpx.Response:
        """Send one request, streaming the answer; transport failures become APIErrors.

        ``last``: the connection's last request. llama-server closes a connection after a
        streamed answer, so one reused after a stream would fail; saying so up front keeps
        it out of the pool.
        """
        transport = self.transport
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self.url + path)
        headers = self._close_headers if last else self._headers
        ext = {"timeout": self._timeout if timeout is None else
               httpx.Timeout(timeout).as_dict()}
        req = httpx.Request(method, url, headers=headers, content=body, extensions=ext)
        for attempt in (1, 2):
            try:
                resp = await transport.handle_async_request(req)
                resp.request = req
                return resp
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                # A pooled connection that llama-server had just closed: try a fresh one once.
                if attempt == 2:
                    raise self._transport_error(exc) from None
            except httpx.HTTPError as exc:
                raise self._transport_error(exc) from None
        raise AssertionError("unreachable")

    async def _get_json(self, path: str, timeout: float = HEALTH_TIMEOUT) -> Any:
        resp = await self._send("GET", path, timeout=timeout)
        try:
            content = await resp.aread()
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        finally:
            await resp.aclose()
        if resp.status_code != 200:
            raise self._upstream_error(resp.status_code, content)
        try:
            return orjson.loads(content)
        except orjson.JSONDecodeError:
            raise APIError(502, f"llama-server at {self.url} sent invalid JSON for {path}.",
                           code="upstream_error") from None

    # --- models ---------------------------------------------------------------------------

    async def _fetch_catalog(self) -> list[UpstreamModel]:
        results: tuple[Any, ...] = await asyncio.gather(
            self._get_json("/v1/models"), self._get_json("/props"), return_exceptions=True)
        listing, props = results
        if isinstance(listing, BaseException):
            raise listing
        if not isinstance(listing, dict):
            raise APIError(502, f"llama-server at {self.url} sent an unexpected /v1/models.",
                           code="upstream_error")
        self._auth_error = None
        model_path = props.get("model_path") if isinstance(props, dict) else None
        slots = props.get("total_slots") if isinstance(props, dict) else None
        if isinstance(slots, int) and slots > 0:
            self._slots = slots
        paths: dict[str, str] = {}
        for m in listing.get("models") or []:  # llama-server's ollama-style list has the file
            if isinstance(m, dict) and isinstance(m.get("name"), str):
                paths[m["name"]] = str(m.get("model") or m["name"])
        entries = [e for e in self.registry.list() if e.usable]
        out = []
        for i, card in enumerate(listing.get("data") or []):
            uid = str(card.get("id", ""))
            if not uid:
                continue
            candidates = [paths.get(uid), uid]
            if len(listing.get("data") or []) == 1 and isinstance(model_path, str):
                candidates.insert(0, model_path)
            path = next((p for p in candidates if p and os.path.isfile(p)), None)
            entry = next((e for e in entries if _same_file(path, e.path)), None) if path else None
            meta = card.get("meta") if isinstance(card.get("meta"), dict) else {}
            created = card.get("created")
            out.append(UpstreamModel(
                uid, path or (model_path if isinstance(model_path, str) else None), meta,
                created if isinstance(created, int) else int(time.time()), entry, i == 0))
        return out

    async def catalog(self, refresh: bool = False) -> list[UpstreamModel]:
        fresh = time.monotonic() - self._catalog_at < CATALOG_TTL
        if not refresh and self._catalog is not None and fresh:
            return self._catalog
        async with self._catalog_lock:
            if not refresh and self._catalog is not None and \
                    time.monotonic() - self._catalog_at < CATALOG_TTL:
                return self._catalog
            self._catalog = await self._fetch_catalog()
            self._catalog_at = time.monotonic()
            return self._catalog

    async def resolve(self, name: str) -> UpstreamModel:
        """A model name (ours, an alias, or llama-server's id) to the upstream model."""
        for refresh in (False, True):
            for m in await self.catalog(refresh=refresh):
                if name in m.names:
                    return m
        raise model_not_found(name)

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [m.card() for m in await self.catalog(refresh=True)]}

    # --- generation -----------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        return await self._generate("/v1/chat/completions", req, request)

    async def completion(self, req: CompletionRequest, request: Request) -> Response:
        return await self._generate("/v1/completions", req, request)

    def _body(self, req: ChatCompletionRequest | CompletionRequest | EmbeddingRequest,
              target: UpstreamModel) -> bytes:
        # What the client sent (unknown fields included, so llama-server extras pass through),
        # minus our own keep_alive; our defaults fill in only where llama-server's differ.
        data = req.model_dump(exclude_unset=True, exclude={"keep_alive"})
        data["model"] = target.upstream_id
        if isinstance(req, EmbeddingRequest):
            return orjson.dumps(data)
        limit = self.settings.token_limit  # the same default and cap as in-process
        if isinstance(req, CompletionRequest) and "max_tokens" not in data:
            data["max_tokens"] = req.max_tokens  # OpenAI's 16; llama-server's is unlimited
        elif ("max_tokens" not in data and "max_completion_tokens" not in data
              and (wanted := limit(None)) is not None):
            data["max_tokens"] = wanted
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(data.get(key), int):
                data[key] = limit(data[key])
        if self.settings.max_tokens:
            data.setdefault("max_tokens", self.settings.max_tokens)
        return orjson.dumps(data)

    async def _admit(self, req: ChatCompletionRequest | CompletionRequest | EmbeddingRequest,
                     request: Request, path: str) -> tuple[httpx.Response, float]:
        """Resolve the model, send the request, and return llama-server's 200 answer."""
        t0 = time.monotonic()
        turn = False
        try:
            target = await self.resolve(req.model)
            if isinstance(req, EmbeddingRequest) and req.dimensions is not None:
                n_embd = target.n_embd
                if n_embd is not None and req.dimensions != n_embd:
                    raise APIError(400, f"This model's embeddings have {n_embd} dimensions; "
                                   f"'dimensions' = {req.dimensions} is not supported.",
                                   param="dimensions", code="invalid_value")
            body = self._body(req, target)
            stream = isinstance(req, ChatCompletionRequest | CompletionRequest) and req.stream
            self._take_turn()
            turn = True
            resp = await unless_disconnected(request,
                                             self._send("POST", path, body, last=stream))
        except APIError as exc:
            self.stats.record("rejected" if exc.status in (429, 503) else "failed")
            if turn:
                self.end_turn(t0, False)
            raise
        except BaseException as exc:
            if isinstance(exc, ClientGone):
                self.stats.record("cancelled")
            if turn:
                self.end_turn(t0, False)
            raise
        if resp.status_code != 200:
            self.end_turn(t0, False)
            try:
                content = await resp.aread()
            except httpx.HTTPError:
                content = b""
            finally:
                await resp.aclose()
            error = self._upstream_error(resp.status_code, content)
            self.stats.record("rejected" if error.status in (429, 503) else "failed")
            raise error
        self._auth_error = None
        self.stats.begin()
        return resp, t0

    async def _read_all(self, resp: httpx.Response, started: float) -> bytes:
        """The whole answer of a non-streamed request; bookkeeping for failures.

        llama-server sends its headers only once the answer is ready, so the body follows
        at once: the wait that a leaving client must cut short was the one for the headers.
        """
        try:
            return await resp.aread()
        except httpx.HTTPError as exc:
            self.stats.end("failed")
            if isinstance(exc, httpx.TimeoutException):
                raise self._transport_error(exc) from None
            raise APIError(502, f"llama-server at {self.url} closed the connection before "
                           f"its answer was complete ({exc}).",
                           code="upstream_disconnected") from None
        except BaseException:
            self.stats.end("cancelled")
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await resp.aclose()
            self.end_turn(started, True)

    def _upstream_error(self, status: int, content: bytes) -> APIError:
        """llama-server's error as ours; a refused key is remembered for /health."""
        error = upstream_error(status, content, self.url, bool(self.settings.llamacpp_api_key))
        if error.code == "upstream_auth_failed":
            if self._auth_error is None:
                log.warning("%s", error.message)
            self._auth_error = error.message
        return error

    def _take_turn(self) -> None:
        """Count this request in, or refuse it with a 429 when the queue is full."""
        waiting = self._in_flight - self._slots
        if waiting >= self.settings.max_queue:
            retry = max(1, round((waiting + 1) * self._job_seconds / self._slots))
            raise APIError(
                429, f"llama-server at {self.url} is busy: {self._slots} slot(s) working and "
                f"{waiting} request(s) waiting (max_queue {self.settings.max_queue}); retry "
                "later.", code="rate_limit_exceeded", headers={"Retry-After": str(retry)})
        self._in_flight += 1

    def end_turn(self, started: float, finished: bool) -> None:
        self._in_flight -= 1
        if finished:
            self._job_seconds += 0.2 * (time.monotonic() - started - self._job_seconds)

    async def _generate(self, path: str, req: ChatCompletionRequest | CompletionRequest,
                        request: Request) -> Response:
        if log.isEnabledFor(logging.DEBUG):  # prompt text is logged at debug level only
            log.debug("%s model=%s body=%r", path, req.model, req.model_dump(exclude_unset=True))
        resp, t0 = await self._admit(req, request, path)
        rewrite = ModelRewrite(req.model)
        if req.stream:
            relay = Relay(self, resp, t0)
            return RelayResponse(self._relay(relay, rewrite, t0, path), relay)
        content = rewrite(await self._read_all(resp, t0))
        self.stats.end("completed", *token_counts(content))
        return Response(content, media_type="application/json")

    async def _relay(self, relay: Relay, rewrite: ModelRewrite, t0: float,
                     route: str) -> AsyncIterator[bytes]:
        """Pass llama-server's SSE bytes through as they arrive, whole events at a time."""
        tail = relay.tail
        pending = b""
        first = True
        done = upstream_failed = False
        try:
            try:
                async for chunk in relay.resp.aiter_raw():
                    if first:
                        self.stats.ttft.labels(route).observe(time.monotonic() - t0)
                        first = False
                    data = pending + chunk if pending else chunk
                    if data.endswith(b"\n\n"):  # the usual case: whole events, no copy
                        out, pending = rewrite(data), b""
                    else:
                        cut = data.rfind(b"\n\n") + 2
                        if cut == 1:  # no event boundary yet
                            if len(data) < MAX_PENDING:
                                pending = data
                                continue
                            cut = len(data)
                        out, pending = rewrite(data[:cut]), data[cut:]
                    if _ERROR_EVENT in out:
                        out = self._convert_errors(out)
                        upstream_failed = True
                    if _DONE_MARK in out:
                        done = True
                        # Settled before the last write: a client that hangs up once it has
                        # [DONE] got the whole answer, and is not a cancel.
                        relay.outcome = "failed" if upstream_failed else "completed"
                    tail.append(out)
                    yield out
            except httpx.HTTPError as exc:
                log.warning("llama-server stream from %s broke: %r", self.url, exc)
                if isinstance(exc, httpx.TimeoutException):
                    msg = (f"llama-server at {self.url} sent nothing for "
                           f"{self.settings.request_timeout:g}s; the stream was stopped.")
                    code = "upstream_timeout"
                else:
                    msg = (f"The connection to llama-server at {self.url} was lost mid-stream "
                           f"({exc or type(exc).__name__}); the answer is incomplete.")
                    code = "upstream_disconnected"
                    self._catalog = None
                relay.outcome = "failed"
                yield event(error_body(msg, "upstream_error", None, code))
                yield DONE
                return
            if not done:
                if not upstream_failed:
                    msg = (f"llama-server at {self.url} ended the stream without finishing "
                           "it; the answer is incomplete.")
                    yield event(error_body(msg, "upstream_error", None, "upstream_disconnected"))
                relay.outcome = "failed"
                yield DONE
                return
            relay.outcome = "failed" if upstream_failed else "completed"
        finally:
            await relay.close()

    def _convert_errors(self, block: bytes) -> bytes:
        """llama-server's mid-stream ``data: {"error": {...}}`` events, in our error shape."""
        events = block.split(b"\n\n")
        for i, ev in enumerate(events):
            if ev.startswith(_ERROR_EVENT):
                try:
                    err = orjson.loads(ev[len(b"data: "):]).get("error") or {}
                    status = int(err.get("code") or 500)
                except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                    status = 500
                api = self._upstream_error(status, ev[len(b"data: "):])
                events[i] = event(api.body())[:-2]
        return b"\n\n".join(events)

    # --- embeddings -----------------------------------------------------------------------

    async def embeddings(self, req: EmbeddingRequest, request: Request) -> Response:
        resp, t0 = await self._admit(req, request, "/v1/embeddings")
        content = ModelRewrite(req.model)(await self._read_all(resp, t0))
        self.stats.end("completed", _first_int(_PROMPT_TOKENS, content) or 0)
        return Response(content, media_type="application/json")

    # --- facts ----------------------------------------------------------------------------

    async def health(self) -> tuple[bool, str, dict[str, Any]]:
        ready, reason, detail = await self._probe()
        self._last_health = {**detail, "checked_at": time.time()}
        self._loading = reason.startswith("loading")
        return ready, reason, detail

    async def _probe(self) -> tuple[bool, str, dict[str, Any]]:
        try:
            resp = await self._send("GET", "/health", timeout=HEALTH_TIMEOUT)
            try:
                content = await resp.aread()
            finally:
                await resp.aclose()
        except (APIError, httpx.HTTPError) as exc:
            why = exc.message if isinstance(exc, APIError) else \
                f"llama-server at {self.url} is not reachable ({exc or type(exc).__name__})"
            if self.supervisor is not None:
                why += f"; {self.supervisor.describe()}"
            return False, why, {"available": False, "ready": False, "details": why}
        if resp.status_code == 200:
            if self._auth_error is not None or self._catalog is None:
                # /health needs no key: until the model list (which does) has come back,
                # or while our key is refused, ask for it.
                with contextlib.suppress(APIError):
                    await self.catalog(refresh=True)
            if self._auth_error is not None:
                return False, self._auth_error, \
                    {"available": True, "ready": False, "details": self._auth_error}
            details = "llama-server is running and ready"
            return True, "", {"available": True, "ready": True, "details": details}
        said = self._upstream_error(resp.status_code, content).message
        said = said.removeprefix("llama-server: ")
        if resp.status_code == 503 and "loading" in said.lower():
            details = f"llama-server at {self.url} is loading its model ({said})"
            return False, f"loading model in llama-server at {self.url} ({said})", \
                {"available": True, "ready": False, "details": details}
        details = f"llama-server at {self.url} is not ready: HTTP {resp.status_code}, {said}"
        return False, details, {"available": True, "ready": False, "details": details}

    async def info(self) -> dict[str, Any]:
        _, _, detail = await self.health()
        upstream: dict[str, Any] = {"url": self.url, **detail}
        models: list[dict[str, Any]] = []
        if detail["available"]:
            results: tuple[Any, ...] = await asyncio.gather(
                self._get_json("/props"), self._get_json("/slots"), self.catalog(refresh=True),
                return_exceptions=True)
            props, slots, catalog = results
            if isinstance(props, dict):
                gen = props.get("default_generation_settings") or {}
                upstream.update({
                    "build_info": props.get("build_info"),
                    "model_path": props.get("model_path"),
                    "model_alias": props.get("model_alias"),
                    "n_ctx": gen.get("n_ctx") if isinstance(gen, dict) else None,
                    "total_slots": props.get("total_slots"),
                    "modalities": props.get("modalities"),
                })
            if isinstance(slots, list):
                upstream["slots_busy"] = sum(
                    1 for s in slots if isinstance(s, dict) and s.get("is_processing"))
            if isinstance(catalog, list):
                models = [m.meta() for m in catalog]
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
        h = self._last_health
        loaded = [{"id": m.id, "upstream_id": m.upstream_id, "path": m.path}
                  for m in self._catalog or []]
        out: dict[str, Any] = {
            "loaded_models": loaded,
            "loading": [m["id"] for m in loaded] if self._loading else [],
            "upstream": {"url": self.url, **h, "slots": self._slots,
                         "in_flight": self._in_flight,
                         "waiting": max(0, self._in_flight - self._slots),
                         "max_queue": self.settings.max_queue},
        }
        if self.supervisor is not None:
            out["supervisor"] = self.supervisor.status()
        return out
