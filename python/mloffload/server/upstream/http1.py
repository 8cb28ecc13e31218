"""A lean HTTP/1.1 transport (an ``httpx.AsyncBaseTransport``) for talking to llama-server.

httpx's own transport (httpcore over anyio) spends several hundred microseconds of CPU on
every read: cancel scopes, h11's state machine, sniffio lookups. On a busy two-core machine
that CPU comes straight out of llama-server's decode and shows up as added latency. This
transport does the same job with an ``asyncio.Protocol`` and httptools' C parser (already
used by uvicorn): keep-alive pooling, chunked and sized bodies, streamed reads, and every
httpx timeout, with failures raised as the httpx exceptions callers already handle.

Plain ``http://`` only; the backend keeps httpx's default transport for ``https://``.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from typing import Any

import httptools
import httpx

READ_HIGH_WATER = 1 << 20  # buffered body bytes at which reading from the socket pauses


class _Connection(asyncio.Protocol):
    """One TCP connection and the response being read on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: tuple[str, int]) -> None:
        self.loop = loop
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.lost_exc: BaseException | None = None
        self.idle_since = 0.0
        self.paused = False  # reading paused: the caller has a lot left to take
        self._waiter: asyncio.Future[None] | None = None
        self._reset()

    def _reset(self) -> None:
        if self.paused and self.transport is not None:
            self.transport.resume_reading()  # an earlier answer was left unread
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.error: httpx.TransportError | None = None
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.got_bytes = False

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if self.idle_since:  # bytes nobody asked for: this connection can't be trusted
            self.close()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.error = httpx.RemoteProtocolError("Unexpected protocol upgrade from server.")
        except httptools.HttpParserError as exc:
            self.error = httpx.RemoteProtocolError(f"Malformed HTTP response: {exc}")
        if self.buffered > READ_HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_exc = exc
        if exc is None and self.headers_done and not self.complete and self._until_close():
            self.complete = True  # a body with neither length nor chunks ends with the stream
        self._wake()

    # --- httptools callbacks -------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def _until_close(self) -> bool:
        """Neither a length nor chunks: the body is whatever comes until the server closes."""
        return not {name.lower() for name, _ in self.headers} & {
            b"content-length", b"transfer-encoding"}

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()

    # --- waiting -----------------------------------------------------------------------

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        """Until the next bytes, the end of the message, or a lost connection."""
        waiter = self._waiter = self.loop.create_future()
        timer = None if timeout is None else self.loop.call_later(
            timeout, _expire, waiter)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._waiter = None

    def failure(self, reading: str) -> httpx.TransportError:
        """What went wrong once the connection is lost or the parser refused the bytes."""
        if self.error is not None:
            return self.error
        if not self.got_bytes:
            return httpx.RemoteProtocolError("Server disconnected without sending a response.")
        detail = f" ({self.lost_exc})" if self.lost_exc else ""
        return httpx.RemoteProtocolError(
            f"Peer closed the connection without sending the complete {reading}{detail}.")

    # --- the request --------------------------------------------------------------------

    async def send_request(self, request: httpx.Request, read_timeout: float | None) -> None:
        self._reset()
        assert self.transport is not None
        target = request.url.raw_path
        head = [request.method.encode(), b" ", target, b" HTTP/1.1\r\n"]
        for name, value in request.headers.raw:
            head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        content = await request.aread()
        self.transport.write(b"".join(head) + content if content else b"".join(head))
        while not self.headers_done:
            if self.error is not None or self.lost:
                raise self.failure("response headers")
            await self._wait_or_timeout(read_timeout)

    async def _wait_or_timeout(self, timeout: float | None) -> None:
        try:
            await self.wait(timeout)
        except TimeoutError:
            raise httpx.ReadTimeout("Timed out while reading from llama-server.") from None

    async def read_body(self, read_timeout: float | None) -> AsyncIterator[bytes]:
        while True:
            if self.body:
                chunk = self.body[0] if len(self.body) == 1 else b"".join(self.body)
                self.body.clear()
                self.buffered = 0
                if self.paused and self.transport is not None:
                    self.paused = False
                    self.transport.resume_reading()
                yield chunk
                continue
            if self.complete:
                return
            if self.error is not None or self.lost:
                raise self.failure("message body")
            await self._wait_or_timeout(read_timeout)

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.lost and self.error is None

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()
        self.lost = True


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Body(httpx.AsyncByteStream):
    """A response body read as it arrives; closing it returns or closes the connection."""

    def __init__(self, pool: HTTP1Transport, conn: _Connection, read_timeout: float | None):
        self.pool = pool
        self.conn = conn
        self.read_timeout = read_timeout
        self.done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.conn.read_body(self.read_timeout):
                yield chunk
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self.pool.release(self.conn)


class HTTP1Transport(httpx.AsyncBaseTransport):
    """Pooled keep-alive HTTP/1.1 connections to plain-HTTP servers."""

    def __init__(self, limits: httpx.Limits) -> None:
        self.max_connections = limits.max_connections
        self.max_keepalive = limits.max_keepalive_connections
        self.keepalive_expiry = limits.keepalive_expiry
        self._idle: list[_Connection] = []
        self._active = 0
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"HTTP1Transport handles http:// only, not "
                                            f"{request.url.scheme}://")
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        key = (request.url.host, request.url.port or 80)
        conn = await self._acquire(key, timeouts.get("connect"), timeouts.get("pool"))
        read_timeout = timeouts.get("read")
        try:
            await conn.send_request(request, read_timeout)
        except BaseException:
            self.release(conn)
            raise
        return httpx.Response(
            conn.parser.get_status_code(), headers=conn.headers,
            stream=_Body(self, conn, read_timeout),
            extensions={"http_version": b"HTTP/1.1"})

    async def _acquire(self, key: tuple[str, int], connect_timeout: float | None,
                       pool_timeout: float | None) -> _Connection:
        await self._slot(pool_timeout)
        expiry = self.keepalive_expiry
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.key == key and not conn.lost and \
                    (expiry is None or now - conn.idle_since < expiry):
                conn.idle_since = 0.0
                return conn
            conn.close()
        try:
            return await self._connect(key, connect_timeout)
        except BaseException:
            self._free_slot()
            raise

    async def _slot(self, timeout: float | None) -> None:
        if self._closed:
            raise httpx.ConnectError("The transport is closed.")
        if self.max_connections is None or self._active < self.max_connections:
            self._active += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            raise httpx.PoolTimeout("Timed out waiting for a connection to llama-server.") \
                from None
        finally:
            if waiter in self._slot_waiters:
                self._slot_waiters.remove(waiter)
        # release() handed its slot over: _active already counts this request.

    def _free_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._active -= 1

    async def _connect(self, key: tuple[str, int], timeout: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(lambda: _Connection(loop, key), *key)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"Timed out connecting to {key[0]}:{key[1]}.") from None
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from None
        return conn

    def release(self, conn: _Connection) -> None:
        """A request is over: keep its connection for the next one, or close it."""
        if conn.reusable() and not self._closed and \
                (self.max_keepalive is None or len(self._idle) < self.max_keepalive):
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        self._free_slot()

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
