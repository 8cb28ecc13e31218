"""Relay one request to a llama-server-like upstream and its answer back to our client.

Shared by the proxy backend (an upstream we do not run) and managed mode (our own engine
processes). Streams are relayed as the bytes arrive, cut only at SSE event boundaries; the
one rewrite is the ``model`` field (the name the client asked for instead of the upstream's
id), a byte replace. A client that goes away closes the upstream stream, and llama-server
stops generating. A stream cut mid-way ends with an error event and ``[DONE]``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import anyio
import httpx
import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ...config import Settings
from ..backend import ClientGone, access, unless_disconnected
from ..errors import APIError, error_body
from ..responses import SSE_HEADERS
from ..schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from ..sse import DONE, event
from ..stats import Outcome, Stats
from .client import UpstreamClient

log = logging.getLogger("mloffload.server")

MAX_PENDING = 1 << 20  # bytes held back waiting for an SSE event boundary

_MODEL_FIELD = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_PREDICTED_N = re.compile(rb'"predicted_n"\s*:\s*(\d+)')
_PROMPT_N = re.compile(rb'"prompt_n"\s*:\s*(\d+)')
_CACHE_N = re.compile(rb'"cache_n"\s*:\s*(\d+)')
_ERROR_EVENT = b'data: {"error"'
_DONE_MARK = b"data: [DONE]"

AnyRequest = ChatCompletionRequest | CompletionRequest | EmbeddingRequest
# Asked when a connection breaks mid-answer: a better explanation than "disconnected"
# (managed mode: the engine died, with its signal and log), or None.
Explain = Callable[[], Awaitable[APIError | None]]


@dataclasses.dataclass(frozen=True)
class StreamEnd:
    """How a relayed stream says it is complete, and what follows an error event when it
    breaks before that."""

    mark: bytes
    trailer: bytes


OPENAI_END = StreamEnd(_DONE_MARK, DONE)
# llama-server's own streams (/completion, /infill): the last event has "stop":true (a
# string value cannot hold those bytes unescaped), and no [DONE] follows.
LLAMA_END = StreamEnd(b'"stop":true', b"")


class Reshape(Protocol):
    """What becomes of an upstream answer on its way to our client."""

    def block(self, data: bytes) -> bytes:
        """Whole SSE events of a stream."""
        ...

    def body(self, data: bytes) -> bytes:
        """A whole non-streamed answer."""
        ...


# Transport failures before the answer's headers: the request reached no one, or the
# connection broke before a byte of the answer came back, so another replica can take it.
NOT_SENT_CODES = frozenset({"backend_unavailable", "upstream_error"})


class NotSent(Exception):
    """``forward(..., retry=True)``: the connection failed before any byte of the answer; the
    turn is ended and nothing was counted, so the caller may send it elsewhere."""

    def __init__(self, error: APIError) -> None:
        super().__init__(error.message)
        self.error = error


class Turn(Protocol):
    """A request's place at the upstream (a slot lease, or an admission count)."""

    def end(self, outcome: Outcome) -> None: ...


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
    """Replace the upstream's ``"model": "<its id>"`` with the name the client sent."""

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

    block = body = __call__


def request_body(req: AnyRequest, upstream_id: str, settings: Settings,
                 extra: dict[str, object] | None = None) -> bytes:
    """What the client sent (unknown fields included, so llama-server extras pass through),
    minus our own keep_alive, with our max_tokens default and cap and our seed rule."""
    data = req.model_dump(exclude_unset=True, exclude={"keep_alive"})
    data["model"] = upstream_id
    if not isinstance(req, EmbeddingRequest):
        params = req.sampling(settings)  # the same default and cap as in-process
        data.pop("max_completion_tokens", None)
        if params.max_tokens is not None:
            data["max_tokens"] = params.max_tokens
        if params.seed is not None:
            # As in-process: a seeded request evaluates its whole prompt afresh, so its
            # logits do not depend on what an earlier request left in the cache.
            data["seed"] = params.seed
            data.setdefault("cache_prompt", False)
    if extra:
        data.update(extra)
    return orjson.dumps(data)


async def post_plain(client: UpstreamClient, path: str, data: dict[str, object],
                     request: Request) -> Response:
    """A quick JSON request (``/tokenize``, ``/detokenize``) and its answer as it is; its
    errors in our shape. Not an inference request: nothing is counted."""
    try:
        resp = await unless_disconnected(request, client.send("POST", path, orjson.dumps(data)))
        content = await resp.aread()
        await resp.aclose()
    except httpx.HTTPError as exc:
        raise client.transport_error(exc) from None
    if resp.status_code != 200:
        raise client.error(resp.status_code, content)
    return Response(content, media_type="application/json")


class Relay:
    """One answer's upstream response and bookkeeping, closed exactly once."""

    __slots__ = ("closed", "outcome", "request", "resp", "stats", "tail", "turn")

    def __init__(self, stats: Stats, turn: Turn, resp: httpx.Response, request: Request
                 ) -> None:
        self.stats = stats
        self.turn = turn
        self.resp = resp
        self.request = request
        self.outcome = Outcome.CANCELLED  # unless the answer reaches its end
        self.tail: collections.deque[bytes] = collections.deque(maxlen=3)  # for the usage
        self.closed = False

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with anyio.CancelScope(shield=True):
            await self.resp.aclose()
        prompt, completion = token_counts(b"".join(self.tail))
        access(self.request).tokens(prompt, completion)
        self.stats.end(self.outcome, prompt, completion)
        self.turn.end(self.outcome)


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


class Forwarder:
    """Sends requests to one upstream client and relays the answers."""

    def __init__(self, client: UpstreamClient, stats: Stats, settings: Settings,
                 explain: Explain | None = None) -> None:
        self.client = client
        self.stats = stats
        self.settings = settings
        self.explain = explain

    async def _broken(self, default: APIError) -> APIError:
        if self.explain is not None and (better := await self.explain()) is not None:
            return better
        return default

    async def forward(self, path: str, body: bytes, requested: str, stream: bool,
                      request: Request, turn: Turn, route: str, *,
                      reshape: Reshape | None = None, end: StreamEnd = OPENAI_END,
                      retry: bool = False) -> Response:
        """Send ``body`` and answer with the upstream's answer. ``turn`` is held by the
        caller and ended here, whatever happens. ``reshape`` replaces the model-name rewrite
        (a translation to another API); ``end`` is the output's end-of-stream marker.
        ``retry``: raise NotSent, uncounted, when the connection fails before the answer
        begins (another replica may take it)."""
        t0 = time.monotonic()
        try:
            resp = await unless_disconnected(request,
                                             self.client.send("POST", path, body, last=stream))
        except APIError as exc:
            if retry and exc.code in NOT_SENT_CODES:
                turn.end(Outcome.FAILED)
                raise NotSent(exc) from None
            if exc.code in ("upstream_error", "backend_unavailable", "upstream_timeout"):
                exc = await self._broken(exc)  # e.g. the engine died under the request
            self.stats.record(Outcome.REJECTED if exc.status in (429, 503) else Outcome.FAILED)
            turn.end(Outcome.FAILED)
            raise exc from None
        except BaseException as exc:
            if isinstance(exc, ClientGone):
                self.stats.record(Outcome.CANCELLED)
            turn.end(Outcome.CANCELLED)
            raise
        if resp.status_code != 200:
            try:
                content = await resp.aread()
            except httpx.HTTPError:
                content = b""
            finally:
                await resp.aclose()
            error = self.client.error(resp.status_code, content)
            self.stats.record(Outcome.REJECTED if error.status in (429, 503)
                              else Outcome.FAILED)
            turn.end(Outcome.FAILED)
            raise error
        self.client.auth_error = None
        self.stats.begin()
        shape = reshape or ModelRewrite(requested)
        relay = Relay(self.stats, turn, resp, request)
        if stream:
            return RelayResponse(self._relay(relay, shape, t0, route, end), relay)
        content = shape.body(await self._read_all(relay))
        return Response(content, media_type="application/json")

    async def _read_all(self, relay: Relay) -> bytes:
        """The whole answer of a non-streamed request; bookkeeping for failures.

        llama-server sends its headers only once the answer is ready, so the body follows
        at once: the wait that a leaving client must cut short was the one for the headers.
        """
        try:
            content = await relay.resp.aread()
        except httpx.HTTPError as exc:
            relay.outcome = Outcome.FAILED
            await relay.close()
            if isinstance(exc, httpx.TimeoutException):
                raise self.client.transport_error(exc) from None
            raise await self._broken(APIError(
                502, f"{self.client.label} closed the connection before its answer was "
                f"complete ({exc}).", code="upstream_disconnected")) from None
        except BaseException:
            await relay.close()
            raise
        relay.tail.append(content)
        relay.outcome = Outcome.COMPLETED
        await relay.close()
        return content

    async def _relay(self, relay: Relay, shape: Reshape, t0: float, route: str,
                     end: StreamEnd) -> AsyncIterator[bytes]:
        """Pass the upstream's SSE bytes through as they arrive, whole events at a time."""
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
                        raw, pending = data, b""
                    else:
                        cut = data.rfind(b"\n\n") + 2
                        if cut == 1:  # no event boundary yet
                            if len(data) < MAX_PENDING:
                                pending = data
                                continue
                            cut = len(data)
                        raw, pending = data[:cut], data[cut:]
                    out = shape.block(raw)
                    if _ERROR_EVENT in out:
                        out = self._convert_errors(out)
                        upstream_failed = True
                    if end.mark in out:
                        done = True
                        # Settled before the last write: a client that hangs up once it has
                        # [DONE] got the whole answer, and is not a cancel.
                        relay.outcome = Outcome.FAILED if upstream_failed else Outcome.COMPLETED
                    tail.append(raw)  # the upstream's own usage or timings, for our counts
                    yield out
            except httpx.HTTPError as exc:
                log.warning("stream from %s broke: %r", self.client.label, exc)
                if isinstance(exc, httpx.TimeoutException):
                    err = APIError(504, f"{self.client.label} sent nothing for "
                                   f"{self.client.request_timeout:g}s; the stream was stopped.",
                                   code="upstream_timeout")
                else:
                    self.client.broken()
                    err = await self._broken(APIError(
                        502, f"The connection to {self.client.label} was lost mid-stream "
                        f"({exc or type(exc).__name__}); the answer is incomplete.",
                        code="upstream_disconnected"))
                relay.outcome = Outcome.FAILED
                yield event(error_body(err.message, "upstream_error", None, err.code))
                if end.trailer:
                    yield end.trailer
                return
            if not done:
                if not upstream_failed:
                    err = await self._broken(APIError(
                        502, f"{self.client.label} ended the stream without finishing it; "
                        "the answer is incomplete.", code="upstream_disconnected"))
                    yield event(error_body(err.message, "upstream_error", None, err.code))
                relay.outcome = Outcome.FAILED
                if end.trailer:
                    yield end.trailer
        finally:
            await relay.close()

    def _convert_errors(self, block: bytes) -> bytes:
        """The upstream's mid-stream ``data: {"error": {...}}`` events, in our error shape."""
        events = block.split(b"\n\n")
        for i, ev in enumerate(events):
            if ev.startswith(_ERROR_EVENT):
                try:
                    err = orjson.loads(ev[len(b"data: "):]).get("error") or {}
                    status = int(err.get("code") or 500)
                except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                    status = 500
                api = self.client.error(status, ev[len(b"data: "):])
                events[i] = event(api.body())[:-2]
        return b"\n\n".join(events)
