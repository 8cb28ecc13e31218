"""What hostile or clumsy clients and a broken disk do to a real server (issue 19): each test
reproduces one break against a real server on a free port, with the real model and real
sockets. Checks that need neither are in test_fast_hardening.py."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers import ServerProcess, assert_openai_error

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def srv(data_dir: Path) -> Iterator[ServerProcess]:
    with ServerProcess(data_dir, env={"ML_OFFLOAD_N_CTX": "1024"}) as proc:
        yield proc.wait_ready()


def raw_request(port: int, data: bytes, timeout: float = 30.0) -> bytes:
    """Send bytes as they are; return everything the server answers before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def log_lines_since(proc: ServerProcess, mark: int) -> list[str]:
    return proc.log()[mark:].splitlines()


# --- logs ------------------------------------------------------------------------------


def test_a_path_cannot_forge_a_log_line(srv: ServerProcess) -> None:
    mark = len(srv.log())
    forged = "2026-12-01T08:00:00 INFO mloffload.access: GET /admin 200 1.0ms"
    path = "/x%0a" + forged.replace(" ", "%20") + "%0d%1b[2J"
    answer = raw_request(srv.port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         "Connection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 404")
    log = srv.wait_log(" 404 ")[mark:]
    lines = log.splitlines()
    assert not any(line.startswith("2026-12-01T08:00:00") for line in lines), log
    assert "\x1b" not in log and "\r" not in log
    assert any("/x\\n2026-12-01T08:00:00" in line for line in lines), log


def test_a_model_name_cannot_forge_a_log_line(srv: ServerProcess) -> None:
    mark = len(srv.log())
    name = "nope\n2026-12-01T08:00:00 INFO mloffload.access: POST /v1/chat/completions 200"
    r = httpx.post(srv.url + CHAT, json={"model": name, "messages": USER}, timeout=30)
    assert_openai_error(r, 404, code="model_not_found")
    log = srv.wait_log("model=nope")[mark:]
    assert not any(line.startswith("2026-12-01T08:00:00") for line in log.splitlines()), log
    assert "model=nope\\n2026" in log


def test_lone_surrogate_is_400_and_no_prompt_reaches_the_log(srv: ServerProcess) -> None:
    mark = len(srv.log())
    secret = "purple-elephant-prompt"
    body = json.dumps({"messages": [{"role": "user", "content": secret + "\ud800"}]})
    r = httpx.post(srv.url + CHAT, content=body.encode(), timeout=30,
                   headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400, code="invalid_value", param="messages[0].content")
    big = {"messages": [{"role": "user", "content": secret + " word" * 600_000}]}
    r = httpx.post(srv.url + CHAT, json=big, timeout=120)
    assert_openai_error(r, 400, code="context_length_exceeded")
    log = srv.wait_log("POST /v1/chat/completions 400", timeout=60)[mark:]
    assert secret not in log and "Traceback" not in log
    assert max(len(line) for line in log.splitlines()) < 5000
    assert httpx.post(srv.url + CHAT, json={"messages": USER, "max_tokens": 2},
                      timeout=60).status_code == 200
