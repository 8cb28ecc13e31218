"""Queueing, cancellation, limits and access control against a real server and model."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest

from helpers import ServerProcess, assert_openai_error, free_port, sse_events, wait_for

LONG = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0.9}


def counters(url: str, headers: dict[str, str] | None = None) -> dict[str, int]:
    return dict(httpx.get(url + "/status", headers=headers, timeout=30).json()["requests"])



@pytest.fixture(scope="module")
def srv(data_dir: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(data_dir, env={"ML_OFFLOAD_N_CTX": "1024", "ML_OFFLOAD_MAX_QUEUE": "1"})
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def start_stream(url: str, started: threading.Event, body: dict[str, Any]) -> list[Any]:
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True},
                      timeout=120) as r:
        events = []
        for event in sse_events(r):
            events.append(event)
            started.set()
        return events


def test_health_status_metrics_answer_while_generating(srv: ServerProcess) -> None:
    started = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        stream = pool.submit(start_stream, srv.url, started, {**LONG, "max_tokens": 200})
        assert started.wait(60)
        for path in ("/health", "/status", "/metrics", "/vram", "/api/health"):
            assert httpx.get(srv.url + path, timeout=5).status_code == 200
        assert counters(srv.url)["active"] == 1
        assert not stream.done()  # they answered while the generation was still running
        events = stream.result()
    assert events[-1] == "[DONE]"


def test_two_streams_both_complete_in_order(srv: ServerProcess) -> None:
    body = {"prompt": "1, 2, 3,", "max_tokens": 30, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start_stream, srv.url, threading.Event(), body) for _ in range(2)]
        results = [f.result() for f in futures]
    texts = []
    for events in results:
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
        texts.append("".join(e["choices"][0]["text"] for e in events[:-1]))
    assert texts[0] == texts[1] and texts[0]  # both whole, neither cut off


def test_queued_requests_are_served_in_arrival_order(data_dir: Path) -> None:
    with ServerProcess(data_dir, env={"ML_OFFLOAD_N_CTX": "1024"}) as proc:
        proc.wait_ready()
        started = threading.Event()
        finished: list[int] = []

        def queued(i: int) -> None:
            r = httpx.post(proc.url + "/v1/completions", timeout=120,
                           json={"prompt": f"{i}:", "max_tokens": 2})
            assert r.status_code == 200
            finished.append(i)

        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            first = pool.submit(start_stream, proc.url, started, {**LONG, "max_tokens": 60})
            assert started.wait(60)
            jobs = []
            for i in range(4):  # each one is in the queue before the next is sent
                jobs.append(pool.submit(queued, i))
                wait_for(lambda n=i + 1: counters(proc.url)["queued"] == n)
            first.result()
            for job in jobs:
                job.result()
        assert finished == [0, 1, 2, 3]


def test_queue_full_is_429_with_retry_after(srv: ServerProcess) -> None:
    started = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(start_stream, srv.url, started, {**LONG, "max_tokens": 150})
        assert started.wait(60)
        waiting = pool.submit(httpx.post, srv.url + "/v1/completions",
                              json={"prompt": "x", "max_tokens": 2}, timeout=120)
        wait_for(lambda: counters(srv.url)["queued"] == 1)
        before = counters(srv.url)["rejected"]
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        err = assert_openai_error(r, 429, code="rate_limit_exceeded", type_="rate_limit_error")
        assert int(r.headers["Retry-After"]) >= 1 and "queue" in err["message"]
        assert counters(srv.url)["rejected"] == before + 1
        assert waiting.result().status_code == 200  # the queued one is still served
        assert running.result()[-1] == "[DONE]"


def test_stream_closed_after_first_chunk_stops_generation(srv: ServerProcess) -> None:
    before = counters(srv.url)
    with httpx.stream("POST", srv.url + "/v1/completions", json={**LONG, "stream": True},
                      timeout=60) as r:
        next(sse_events(r))
    wait_for(lambda: counters(srv.url)["cancelled"] == before["cancelled"] + 1)
    wait_for(lambda: counters(srv.url)["active"] == 0)
    generated = counters(srv.url)["tokens_generated"] - before["tokens_generated"]
    assert generated < 40, generated  # of 400 asked for
    ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3},
                    timeout=60)
    assert ok.status_code == 200


def test_non_stream_client_timeout_stops_generation(srv: ServerProcess) -> None:
    before = counters(srv.url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/completions", json=LONG, timeout=1.5)
    wait_for(lambda: counters(srv.url)["cancelled"] == before["cancelled"] + 1)
    wait_for(lambda: counters(srv.url)["active"] == 0)
    generated = counters(srv.url)["tokens_generated"] - before["tokens_generated"]
    assert generated < 300, generated
    assert httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3},
                      timeout=60).status_code == 200


def test_queued_request_whose_client_leaves_never_runs(srv: ServerProcess) -> None:
    before = counters(srv.url)
    started = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(start_stream, srv.url, started, {**LONG, "max_tokens": 120})
        assert started.wait(60)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions",
                       json={"prompt": "queued", "max_tokens": 50}, timeout=1)
        wait_for(lambda: counters(srv.url)["cancelled"] == before["cancelled"] + 1)
        assert counters(srv.url)["active"] == 1  # only the first one
        running.result()
    after = counters(srv.url)
    # The generation that ran produced all the tokens; the queued one produced none.
    assert after["completed"] == before["completed"] + 1
    assert after["tokens_generated"] - before["tokens_generated"] <= 120


def test_request_timeout(data_dir: Path) -> None:
    with ServerProcess(data_dir, env={"ML_OFFLOAD_REQUEST_TIMEOUT": "1s",
                                      "ML_OFFLOAD_N_CTX": "1024"}) as proc:
        proc.wait_ready()
        r = httpx.post(proc.url + "/v1/completions", json=LONG, timeout=60)
        assert_openai_error(r, 504, code="request_timeout")
        with httpx.stream("POST", proc.url + "/v1/completions",
                          json={**LONG, "stream": True}, timeout=60) as s:
            events = list(sse_events(s))
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "request_timeout"
        assert counters(proc.url)["failed"] == 2


def test_body_limit(srv: ServerProcess) -> None:
    big = {"messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    assert_openai_error(httpx.post(srv.url + "/v1/chat/completions", json=big, timeout=60), 413,
                        code="request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(5):
            yield b"y" * (1024 * 1024)
        yield b'"}]}'

    r = httpx.post(srv.url + "/v1/chat/completions", content=chunks(), timeout=60,
                   headers={"Content-Type": "application/json"})
    assert_openai_error(r, 413, code="request_too_large")


def test_list_limits(srv: ServerProcess) -> None:
    r = httpx.post(srv.url + "/v1/embeddings", json={"input": ["a"] * 2049}, timeout=60)
    assert_openai_error(r, 400, param="input")
    msgs = [{"role": "user", "content": "a"}] * 2049
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": msgs}, timeout=60)
    assert_openai_error(r, 400, param="messages")


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "..%2F..%2Fetc%2Fpasswd",
                                  "%2Fetc%2Fpasswd", "....//....//etc/passwd", "~/.ssh/id_rsa",
                                  "C:\\Windows\\win.ini"])
def test_path_like_model_names_are_unknown(srv: ServerProcess, name: str) -> None:
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                   json={"model": name, "messages": [{"role": "user", "content": "x"}]})
    assert_openai_error(r, 404, code="model_not_found")
    r = httpx.post(srv.url + "/v1/embeddings", json={"model": name, "input": "x"}, timeout=30)
    assert_openai_error(r, 404, code="model_not_found")
    assert httpx.get(srv.url + "/v1/models/" + name, timeout=30).status_code == 404
    assert httpx.post(srv.url + f"/api/models/{name}/load", timeout=30).status_code == 404


def test_resolving_a_name_never_touches_the_filesystem(tmp_path: Path, model_path: Path) -> None:
    from mloffload.models.registry import Registry

    reg = Registry(tmp_path / "r.sqlite3")
    reg.register_file(model_path, "embedded")
    boom = mock.Mock(side_effect=AssertionError("filesystem touched"))
    with mock.patch("os.stat", boom), mock.patch("builtins.open", boom), \
            mock.patch("pathlib.Path.exists", boom), mock.patch("os.path.exists", boom):
        for name in ("../../etc/passwd", str(model_path), "/etc/passwd", "nope"):
            assert reg.resolve(name) is None
    reg.close()


# --- access control -------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(data_dir: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(data_dir, env={"ML_OFFLOAD_API_KEY": "k-123456", "ML_OFFLOAD_N_CTX": "512",
                                        "ML_OFFLOAD_CORS_ORIGINS": "http://allowed.example"})
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def test_api_key_required_except_health(keyed: ServerProcess) -> None:
    url = keyed.url
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    for path in ("/v1/models", "/status", "/metrics", "/vram", "/api/health", "/"):
        r = httpx.get(url + path, timeout=10)
        assert_openai_error(r, 401, code="invalid_api_key", type_="authentication_error")
        assert r.headers["WWW-Authenticate"] == "Bearer"
    wrong = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k-12345"})
    assert_openai_error(wrong, 401, code="invalid_api_key")
    basic = httpx.get(url + "/v1/models", headers={"Authorization": "Basic k-123456"})
    assert_openai_error(basic, 401, code="invalid_api_key")
    good = {"Authorization": "Bearer k-123456"}
    assert httpx.get(url + "/v1/models", headers=good, timeout=10).status_code == 200
    r = httpx.post(url + "/v1/chat/completions", headers=good, timeout=60,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200


def test_openai_client_with_key(keyed: ServerProcess) -> None:
    import openai

    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key="k-123456", max_retries=0)
    assert client.models.list().data
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_cors_allow_list(keyed: ServerProcess, srv: ServerProcess) -> None:
    pre = {"Origin": "http://allowed.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(keyed.url + "/v1/chat/completions", headers=pre)
    assert r.headers.get("access-control-allow-origin") == "http://allowed.example"
    evil = {**pre, "Origin": "http://evil.example"}
    r = httpx.options(keyed.url + "/v1/chat/completions", headers=evil)
    assert "access-control-allow-origin" not in r.headers
    # Off by default.
    r = httpx.get(srv.url + "/v1/models", headers={"Origin": "http://allowed.example"})
    assert "access-control-allow-origin" not in r.headers


def test_logs_never_contain_key_or_prompt(keyed: ServerProcess, data_dir: Path) -> None:
    secret = "purple-elephant-prompt"
    httpx.post(keyed.url + "/v1/chat/completions", timeout=60,
               headers={"Authorization": "Bearer k-123456"},
               json={"messages": [{"role": "user", "content": secret}], "max_tokens": 2})
    log = keyed.wait_log("POST /v1/chat/completions 200")
    assert "POST /v1/chat/completions 200" in log
    assert "k-123456" not in log and secret not in log
    with ServerProcess(data_dir, env={"ML_OFFLOAD_LOG_LEVEL": "debug", "ML_OFFLOAD_N_CTX": "512",
                                      "ML_OFFLOAD_API_KEY": "k-999999"}) as debug:
        debug.wait_ready()
        httpx.post(debug.url + "/v1/chat/completions", timeout=60,
                   headers={"Authorization": "Bearer k-999999"},
                   json={"messages": [{"role": "user", "content": secret}], "max_tokens": 2})
        assert secret in debug.wait_log(secret)  # debug logging shows prompts
        assert "k-999999" not in debug.log()  # never the key


def test_public_bind_without_key_refused(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mloffload.server", "--host", "0.0.0.0", "--port",
         str(free_port()), "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 2
    assert "refusing to listen on 0.0.0.0 without an API key" in out.stderr
    assert "Traceback" not in out.stderr
