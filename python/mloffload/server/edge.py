"""The HTTP connection layer under the app: the limits uvicorn's httptools protocol lacks.

- **Connections.** At most ``max_connections`` at once (fewer if the open-file limit says
  so, see ``connection_budget``). Past it, the connection idle the longest (no request in
  flight: silent since it connected, or kept alive after an answer) is closed to make
  room; with none idle, the new one gets a 503 and is closed. Either is logged, at most
  once a minute.
- **Timeouts.** A new connection must send its first request's headers within
  ``first_request_timeout``; a later request's headers must arrive within
  ``header_timeout`` of its first byte, and a body may pause no longer than that. uvicorn
  itself closes a kept-alive connection idle for ``KEEP_ALIVE`` (``__main__``, 65 s).
- **Head size.** A request line and headers longer than ``max_header_size`` get a 431.
- **Back-pressure.** A client that pipelines requests without reading the answers is not
  read further once ``PIPELINE_DEPTH`` requests wait: what it sent stays unparsed (at most
  one read of it) until answers go out.
- **HTTP/1.0** has no chunked encoding: a streamed answer to it ends when the connection
  closes.

The protocol is uvicorn's ``HttpToolsProtocol`` with these hooks; it relies on that class's
``pipeline``, ``flow`` and ``_start_asgi_task`` (uvicorn 0.3x-0.5x), which the edge tests
exercise over real sockets.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import resource
import time
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from ..config import Settings
from .errors import APIError

log = logging.getLogger("mloffload.edge")

PIPELINE_DEPTH = 16  # requests parsed ahead of their answers on one connection
SLICE = 4096  # bytes handed to the parser at once: the head limit is checked between slices
MAX_BACKLOG = 1024 * 1024  # unparsed bytes one connection may leave waiting
FD_RESERVE = 128  # open files kept for everything but client connections
WARN_EVERY = 60.0  # seconds between two warnings about the connection limit
LINGER = 2.0  # seconds an error answer waits for the client to read it before closing


@dataclasses.dataclass(frozen=True)
class EdgeLimits:
    max_connections: int
    first_request_timeout: float
    header_timeout: float
    max_header_size: int


def connection_budget(wanted: int) -> int:
    """How many client connections the open-file limit allows, up to ``wanted``.

    The soft limit is raised towards the hard one first (systemd's default soft limit is
    1,024); FD_RESERVE files stay for models, the registry, logs and engine processes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(hard, need)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    allowed = max(1, min(wanted, soft - FD_RESERVE))
    if allowed < wanted:
        log.warning("the open-file limit (%d) allows %d connections, not the %d of "
                    "--max-connections; raise it (LimitNOFILE= in the unit, ulimit -n)",
                    soft, allowed, wanted)
    return allowed


def limits_from(settings: Settings) -> EdgeLimits:
    return EdgeLimits(connection_budget(settings.max_connections),
                      settings.first_request_timeout, settings.header_timeout,
                      settings.max_header_size)


def _raw_error(status: int, reason: str, error: APIError) -> bytes:
    body = orjson.dumps(error.body())
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


TIMED_OUT = _raw_error(408, "Request Timeout", APIError(
    408, "The request's headers did not arrive in time.", code="request_timeout"))
REFUSED = _raw_error(503, "Service Unavailable", APIError(
    503, "Too many connections; retry shortly.", code="too_many_connections"))


class EdgeState:
    """What the connections of one server share: which are idle (oldest first), and the
    counts behind the warning about the connection limit."""

    def __init__(self, limits: EdgeLimits) -> None:
        self.limits = limits
        self.idle: collections.OrderedDict[EdgeProtocol, None] = collections.OrderedDict()
        self.evicted = 0
        self.refused = 0
        self._warned = 0.0

    def make_room(self, newcomer: EdgeProtocol, open_now: int) -> bool:
        """Whether ``newcomer`` may stay: under the limit, or once an idle one is closed."""
        if open_now <= self.limits.max_connections:
            return True
        for old in self.idle:
            if old is not newcomer:
                self.idle.pop(old)
                old.close_idle()
                self.evicted += 1
                self._warn()
                return True
        self.refused += 1
        self._warn()
        return False

    def _warn(self) -> None:
        now = time.monotonic()
        if now - self._warned < WARN_EVERY:
            return
        self._warned = now
        log.warning("connection limit (%d) reached: %d idle connections closed and %d new "
                    "ones refused so far; raise --max-connections (and the open-file limit) "
                    "if this load is expected", self.limits.max_connections, self.evicted,
                    self.refused)


class CloseDelimitedCycle(RequestResponseCycle):
    """An answer to HTTP/1.0 without a Content-Length: no chunked encoding (1.0 has none),
    the body simply ends when the connection closes."""

    _close_delimited: bool | None = None

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start" and self._close_delimited is None:
            names = {name.lower() for name, _ in message.get("headers", [])}
            self._close_delimited = (
                self.scope["method"] != "HEAD" and message["status"] not in (204, 304)
                and not names & {b"content-length", b"transfer-encoding"})
            if self._close_delimited:
                self.chunked_encoding = False
                self.keep_alive = False
        elif message["type"] == "http.response.body" and self._close_delimited:
            self.expected_content_length = len(message.get("body", b""))
        await super().send(message)


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's protocol with the limits above; ``edge`` is set by ``protocol_class``."""

    edge: EdgeState

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._requests = 0
        self._in_head = False
        self._head_bytes = 0
        self._backlog = bytearray()
        self._discarding = False

    # --- connections and deadlines ----------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.edge.make_room(self, len(self.connections)):
            self._answer_and_close(REFUSED)
            return
        self.edge.idle[self] = None
        self._arm(self.edge.limits.first_request_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.edge.idle.pop(self, None)
        super().connection_lost(exc)

    def close_idle(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.transport.close()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._discarding:
            self.transport.close()
            return
        if self.flow.read_paused:  # we stopped reading (a busy app): not the client's fault
            self._arm(self.edge.limits.header_timeout)
            return
        log.debug("closing a connection from %s: nothing complete arrived in time",
                  self.client)
        if self._in_head:
            self._answer_and_close(TIMED_OUT)
        else:
            self.transport.close()

    def _answer_and_close(self, answer: bytes) -> None:
        """Send an error and close once the client has had time to read it: closing at
        once with its request still unread would reset the connection, and the answer
        with it. What the client still sends meanwhile is dropped."""
        self._discarding = True
        self.edge.idle.pop(self, None)
        self.transport.write(answer)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self._arm(LINGER)

    # --- reading ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._backlog or len(self.pipeline) >= PIPELINE_DEPTH:
            self._hold(data)
            return
        self._feed(data)

    def _hold(self, data: bytes | memoryview) -> None:
        self._backlog += data
        self.flow.pause_reading()
        if len(self._backlog) > MAX_BACKLOG:
            self.transport.close()

    def _feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        for start in range(0, len(view), SLICE):
            if self.transport.is_closing():
                return
            if len(self.pipeline) >= PIPELINE_DEPTH:
                self._hold(view[start:])
                return
            piece = view[start:start + SLICE]
            super().data_received(bytes(piece))
            if self._discarding:
                return
            if self._in_head:
                self._head_bytes += len(piece)
                if self._head_bytes > self.edge.limits.max_header_size:
                    self._too_large()
                    return

    def _too_large(self) -> None:
        limit = self.edge.limits.max_header_size
        self._answer_and_close(_raw_error(431, "Request Header Fields Too Large", APIError(
            431, f"The request line and headers are longer than the limit of {limit} bytes.",
            code="headers_too_large")))

    # --- parser callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.edge.idle.pop(self, None)
        self._requests += 1
        self._in_head = True
        self._head_bytes = 0
        if self._requests > 1:  # the first request still has its first_request_timeout
            self._arm(self.edge.limits.header_timeout)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._arm(self.edge.limits.header_timeout)  # for the body; ended by on_message_complete
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._arm(self.edge.limits.header_timeout)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    # --- answers --------------------------------------------------------------------------

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        if cycle.scope.get("http_version") == "1.0":
            cycle.__class__ = CloseDelimitedCycle
        super()._start_asgi_task(cycle, app)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self._backlog and len(self.pipeline) < PIPELINE_DEPTH:
            held, self._backlog = bytes(self._backlog), bytearray()
            self._feed(held)
        if self._backlog or len(self.pipeline) >= PIPELINE_DEPTH:
            self.flow.pause_reading()
        elif not self.pipeline and (self.cycle is None or self.cycle.response_complete):
            self.edge.idle[self] = None


def protocol_class(limits: EdgeLimits) -> type[EdgeProtocol]:
    """A protocol class for one server (uvicorn instantiates it per connection)."""

    class ServerEdgeProtocol(EdgeProtocol):
        edge = EdgeState(limits)

    return ServerEdgeProtocol
