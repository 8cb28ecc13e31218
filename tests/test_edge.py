"""The HTTP connection layer (server/edge.py) over real sockets: idle and unfinished
connections, the connection limit, head size, pipelining without reading, HTTP/1.0, HEAD and
the Host rule. Floods here are small enough to run in seconds; bench/edge.py measures the big
ones (1,100 idle connections, 200,000 pipelined requests, 64 MiB headers)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers import ServerProcess, assert_openai_error, wait_for

SHORT = {"ML_OFFLOAD_FIRST_REQUEST_TIMEOUT": "1s", "ML_OFFLOAD_HEADER_TIMEOUT": "1s",
         "ML_OFFLOAD_MAX_CONNECTIONS": "20", "ML_OFFLOAD_N_CTX": "512"}


@pytest.fixture(scope="module")
def edge(data_dir: Path) -> Iterator[ServerProcess]:
    with ServerProcess(data_dir, env=SHORT) as proc:
        yield proc.wait_ready()


def connect(port: int, timeout: float = 30.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return sock


def closed_by_server(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a timeout here fails the test)."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b"" and False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def health(url: str) -> int:
    return httpx.get(url + "/health", timeout=30).status_code


def test_silent_connections_are_closed(edge: ServerProcess) -> None:
    socks = [connect(edge.port) for _ in range(10)]
    try:
        for sock in socks:
            assert closed_by_server(sock) == b""  # nothing was asked, nothing is answered
        assert health(edge.url) == 200
    finally:
        for sock in socks:
            sock.close()


def test_a_head_that_never_ends_gets_408(edge: ServerProcess) -> None:
    with connect(edge.port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        with contextlib.suppress(OSError):
            for _ in range(100):  # a header byte now and then, never the blank line
                sock.sendall(b"X")
                time.sleep(0.05)
        answer = closed_by_server(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code":"request_timeout"' in answer


def test_a_later_slow_head_on_a_kept_alive_connection_gets_408(edge: ServerProcess) -> None:
    with connect(edge.port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = b""
        while not first.endswith(b'{"status":"ok"}'):
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and no more
        assert closed_by_server(sock).startswith(b"HTTP/1.1 408")


def test_past_the_limit_idle_connections_make_room(edge: ServerProcess) -> None:
    before = edge.log()
    socks = [connect(edge.port) for _ in range(25)]  # the limit is 20
    try:
        wait_for(lambda: sum(not still_open(s) for s in socks[:5]) == 5,
                 what="the 5 oldest idle connections to close")
        assert all(still_open(s) for s in socks[5:])
        assert health(edge.url) == 200  # one more makes room again
        log = edge.wait_log("connection limit (20) reached")
        assert log.count("connection limit (20) reached") - \
            before.count("connection limit (20) reached") <= 1  # at most once a minute
    finally:
        for sock in socks:
            sock.close()


def test_past_the_limit_with_none_idle_a_newcomer_gets_503(data_dir: Path) -> None:
    env = {**SHORT, "ML_OFFLOAD_FIRST_REQUEST_TIMEOUT": "30s"}
    with ServerProcess(data_dir, env=env) as proc:
        proc.wait_ready()
        busy = [connect(proc.port) for _ in range(20)]
        try:
            for sock in busy:  # each is in the middle of its request's head
                sock.sendall(b"GET /health HTTP/1.1\r\n")
            with connect(proc.port) as late:
                answer = closed_by_server(late)
            assert answer.startswith(b"HTTP/1.1 503"), answer
            assert b'"code":"too_many_connections"' in answer
        finally:
            for sock in busy:
                sock.close()
        wait_for(lambda: health(proc.url) == 200, what="/health")


def test_the_open_file_limit_caps_connections(data_dir: Path) -> None:
    env = {k: v for k, v in SHORT.items() if k != "ML_OFFLOAD_MAX_CONNECTIONS"}
    with ServerProcess(data_dir, env=env, nofile=256) as proc:
        proc.wait_ready()
        socks = [connect(proc.port) for _ in range(300)]  # more than the process may open
        try:
            assert health(proc.url) == 200
            r = httpx.post(proc.url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert r.status_code == 200
        finally:
            for sock in socks:
                sock.close()
        log = proc.log()
    assert "the open-file limit (256) allows 128 connections" in log
    assert "connection limit (128) reached" in log


def test_an_oversized_head_gets_431(edge: ServerProcess) -> None:
    with connect(edge.port) as sock:
        with contextlib.suppress(OSError):  # the server may close before all of it is sent
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
                         + b"a" * (1024 * 1024) + b"\r\n\r\n")
        answer = closed_by_server(sock)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert health(edge.url) == 200


def test_pipelining_without_reading_is_held_back(edge: ServerProcess) -> None:
    n = 20_000
    with connect(edge.port, timeout=120) as sock:
        before = edge.rss()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * n)
        time.sleep(1.0)  # let it do whatever it does with what it cannot send
        grown = edge.rss() - before
        assert health(edge.url) == 200  # others are served meanwhile
        answers = b""
        while answers.count(b"HTTP/1.1 200") < n:
            chunk = sock.recv(1 << 20)
            assert chunk, answers.count(b"HTTP/1.1 200")
            answers += chunk
    assert answers.count(b"HTTP/1.1 200") == n  # every one answered, in the end
    assert grown < 20 * 1024**2, grown


def test_http_1_0_streams_end_with_the_connection(edge: ServerProcess) -> None:
    body = b'{"prompt": "Once upon a time", "max_tokens": 5, "stream": true}'
    with connect(edge.port, timeout=120) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.0\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        answer = closed_by_server(sock)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
    assert rest.startswith(b"data: {") and rest.endswith(b"data: [DONE]\n\n")


def test_head_requests(edge: ServerProcess) -> None:
    r = httpx.head(edge.url + "/health", timeout=30)
    assert r.status_code == 200 and r.content == b""
    assert int(r.headers["content-length"]) == len(b'{"status":"ok"}')


def test_dns_rebinding_is_refused(edge: ServerProcess) -> None:
    for path in ("/status", "/health"):
        r = httpx.get(edge.url + path, headers={"Host": "rebind.attacker.example"}, timeout=30)
        assert_openai_error(r, 403, code="host_not_allowed")
    r = httpx.post(edge.url + "/api/models/default/unload", timeout=30,
                   headers={"Host": "rebind.attacker.example:9000",
                            "Content-Type": "application/json"})
    assert_openai_error(r, 403, code="host_not_allowed")
    assert httpx.get(f"http://localhost:{edge.port}/status", timeout=30).status_code == 200


def test_a_cross_site_form_cannot_unload(edge: ServerProcess) -> None:
    # What a browser sends for a page's fetch(url, {method: "POST", mode: "no-cors"}).
    r = httpx.post(edge.url + "/api/models/default/unload", content=b"x", timeout=30,
                   headers={"Content-Type": "text/plain", "Origin": "https://evil.example",
                            "Sec-Fetch-Site": "cross-site"})
    assert_openai_error(r, 415, code="unsupported_media_type")
    assert httpx.get(edge.url + "/status", timeout=30).json()["loaded_models"]
