"""The lean HTTP/1.1 transport behind the llama-server backend, against scripted servers.

The real path (a real llama-server, streams, kills, restarts) is covered by
test_upstream.py and test_upstream_faults.py; these tests provoke what llama-server will not
do on demand: a silent server, a malformed answer, a connection cut mid-body, a full pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from mloffload.server.upstream.http1 import HTTP1Transport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body (the body sized by Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return head, body


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
            % (len(body), extra)) + body


class Scripted:
    """An asyncio TCP server running ``handler`` per connection, counting connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"


def client(url: str, timeout: float = 5.0, **limits: Any) -> httpx.AsyncClient:
    lim = httpx.Limits(**limits)
    return httpx.AsyncClient(base_url=url, timeout=timeout, limits=lim,
                             transport=HTTP1Transport(lim))


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        head, body = await read_request(reader)
        target = head.split(b" ", 2)[1]
        writer.write(ok(b'{"target": "%s", "body": %d}' % (target, len(body))))
        await writer.drain()


def test_keep_alive_reuses_one_connection_and_sends_the_request_as_given() -> None:
    async def main() -> None:
        async with Scripted(echo_forever) as srv, client(srv.url) as c:
            for i in range(5):
                r = await c.post(f"/v1/x?i={i}", content=b"a" * (i * 1000),
                                 headers={"Content-Type": "application/json"})
                assert r.status_code == 200
                assert r.json() == {"target": f"/v1/x?i={i}", "body": i * 1000}
            assert srv.connections == 1

    run(main())


def test_connection_close_answer_is_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(b"{}", b"Connection: close\r\n"))
        await writer.drain()

    async def main() -> None:
        async with Scripted(handler) as srv, client(srv.url) as c:
            for _ in range(3):
                assert (await c.get("/health")).status_code == 200
            assert srv.connections == 3

    run(main())


def test_chunked_stream_arrives_piece_by_piece() -> None:
    """The client sees each chunk before the server has written the next one."""
    step = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for i in range(3):
            event = b"data: %d\n\n" % i
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await step.wait()
            step.clear()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        async with Scripted(handler) as srv, client(srv.url) as c:
            async with c.stream("POST", "/v1/completions", content=b"{}") as r:
                seen = []
                async for chunk in r.aiter_raw():
                    seen.append(chunk)
                    step.set()
            assert seen == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]

    run(main())


def test_silent_server_is_a_read_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(10)

    async def main() -> None:
        async with Scripted(handler) as srv, client(srv.url, timeout=0.3) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.get("/slow")

    run(main())


def test_nothing_listening_is_a_connect_error() -> None:
    async def main() -> None:
        async with Scripted(echo_forever) as srv:
            url = srv.url
        async with client(url) as c:
            with pytest.raises(httpx.ConnectError):
                await c.get("/health")

    run(main())


def test_cut_mid_body_is_a_protocol_error_and_the_connection_is_dropped() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()

    async def main() -> None:
        async with Scripted(handler) as srv, client(srv.url) as c:
            with pytest.raises(httpx.RemoteProtocolError, match="complete message body"):
                await c.get("/cut")
            with pytest.raises(httpx.RemoteProtocolError):
                await c.get("/cut")
            assert srv.connections == 2

    run(main())


def test_body_without_length_ends_when_the_server_closes() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()

    async def main() -> None:
        async with Scripted(handler) as srv, client(srv.url) as c:
            r = await c.get("/old-style")
            assert (r.status_code, r.content) == (200, b"all of it")

    run(main())


def test_closed_without_an_answer_and_malformed_answers() -> None:
    async def silent_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async def main() -> None:
        async with Scripted(silent_close) as srv, client(srv.url) as c:
            with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
                await c.get("/x")
        async with Scripted(garbage) as srv, client(srv.url) as c:
            with pytest.raises(httpx.RemoteProtocolError, match="Malformed"):
                await c.get("/x")

    run(main())


def test_full_pool_waits_then_times_out() -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await release.wait()
            writer.write(ok(b"{}"))
            await writer.drain()

    async def main() -> None:
        lim = httpx.Limits(max_connections=1)
        timeout = httpx.Timeout(5.0, pool=0.3)
        async with Scripted(handler) as srv, httpx.AsyncClient(
                base_url=srv.url, timeout=timeout, limits=lim,
                transport=HTTP1Transport(lim)) as c:
            first = asyncio.create_task(c.get("/one"))
            await asyncio.sleep(0.1)
            with pytest.raises(httpx.PoolTimeout):
                await c.get("/two")
            # A waiter that gets the slot: queued behind the first, served after it.
            second = asyncio.create_task(c.get("/three", timeout=5.0))
            await asyncio.sleep(0.1)
            release.set()
            assert (await first).status_code == 200
            assert (await second).status_code == 200
            assert srv.connections == 1

    run(main())


def test_closing_a_stream_early_closes_the_connection() -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        if await reader.read(1) == b"":  # the client hung up
            closed.set()

    async def main() -> None:
        async with Scripted(handler) as srv, client(srv.url) as c:
            async with c.stream("GET", "/s") as r:
                async for chunk in r.aiter_raw():
                    assert chunk == b"first"
                    break
            await asyncio.wait_for(closed.wait(), 5)

    run(main())


async def junk_when_idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(ok(b"{}"))
    await asyncio.sleep(0.05)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")  # answers nothing
    await writer.drain()
    await asyncio.sleep(1)


def test_idle_connections_expire_and_stale_ones_are_skipped() -> None:
    async def one_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(b"{}"))  # keep-alive promised, then the server hangs up
        await writer.drain()
        await asyncio.sleep(0.05)

    async def main() -> None:
        async with Scripted(one_answer) as srv, client(srv.url) as c:
            assert (await c.get("/a")).status_code == 200
            await asyncio.sleep(0.3)  # the server has closed the idle connection by now
            assert (await c.get("/b")).status_code == 200
            assert srv.connections == 2
        async with Scripted(junk_when_idle) as srv, client(srv.url) as c:
            assert (await c.get("/a")).status_code == 200
            await asyncio.sleep(0.3)  # junk arrived on the idle connection meanwhile
            assert (await c.get("/b")).status_code == 200
            assert srv.connections == 2
        async with Scripted(echo_forever) as srv, client(srv.url, keepalive_expiry=0.1) as c:
            assert (await c.get("/a")).status_code == 200
            await asyncio.sleep(0.3)
            assert (await c.get("/b")).status_code == 200
            assert srv.connections == 2

    run(main())


def test_large_body_survives_read_pausing() -> None:
    payload = bytes(range(256)) * (12 * 1024)  # 3 MiB, beyond the read high-water mark

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload))
        for i in range(0, len(payload), 65536):
            writer.write(payload[i:i + 65536])
            await writer.drain()

    async def main() -> None:
        async with Scripted(handler) as srv, client(srv.url) as c:
            async with c.stream("GET", "/big") as r:
                got = bytearray()
                async for chunk in r.aiter_raw():
                    if not got:
                        await asyncio.sleep(0.2)  # a slow reader: the rest piles up meanwhile
                    got += chunk
            assert bytes(got) == payload

    run(main())


def test_a_big_answer_left_unread_does_not_stall_the_next_one() -> None:
    big = b"x" * ((1 << 20) + 1000)  # all of it arrives, and that pauses reading

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(big))
        await writer.drain()
        await read_request(reader)
        writer.write(ok(b"{}"))
        await writer.drain()
        await asyncio.sleep(1)

    async def main() -> None:
        async with Scripted(handler) as srv, client(srv.url, timeout=3.0) as c:
            async with c.stream("GET", "/big") as r:
                assert r.status_code == 200
                await asyncio.sleep(0.3)  # the body is left unread
            assert (await c.get("/small")).status_code == 200
            assert srv.connections == 1

    run(main())


def test_https_is_refused_clearly() -> None:
    async def main() -> None:
        lim = httpx.Limits()
        async with httpx.AsyncClient(transport=HTTP1Transport(lim)) as c:
            with pytest.raises(httpx.UnsupportedProtocol):
                await c.get("https://127.0.0.1:1/")

    run(main())
