"""The llama-server backend when things go wrong: llama-server stopped, killed mid-stream,
restarted, still loading, without embeddings; and supervised by our own server.

The real llama-server provides every fault it can; a small fake upstream adds the ones it
cannot be made to produce on demand (a model still loading, an error event mid-stream, an
answer that is not JSON).
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from helpers import ServerProcess, assert_openai_error, free_port, sse_events, wait_for
from llama_server import LlamaServer, llama_server_bin, proxy_env, running

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello"}]



# --- a real llama-server that the tests stop, kill and restart ----------------------------------


@pytest.fixture(scope="module")
def upstream(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    # No --embeddings: llama-server then answers 501 for embeddings.
    with running(model_path, tmp_path_factory.mktemp("llama-server-faults"),
                 free_port()) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(data_dir: Path, upstream: LlamaServer) -> Iterator[ServerProcess]:
    with ServerProcess(data_dir, env=proxy_env(upstream.url)) as proc:
        yield proc.wait_ready()


@pytest.fixture
def api(proxy: ServerProcess, upstream: LlamaServer) -> Iterator[httpx.Client]:
    upstream.ensure_running()
    with httpx.Client(base_url=proxy.url, timeout=120) as client:
        yield client
        # Whatever broke, every request it admitted has been let go of.
        wait_for(lambda: client.get("/status").json()["upstream"]["in_flight"] == 0,
                 timeout=30, what="in-flight requests to be released")
    assert proxy.proc.poll() is None, "our server must never restart"


def test_embeddings_without_the_flag_come_back_501(api: httpx.Client) -> None:
    r = api.post("/v1/embeddings", json={"input": "hello"})
    err = assert_openai_error(r, 501, "not_supported", "not_implemented_error")
    assert "--embeddings" in err["message"]


def test_stopped_llama_server_then_restarted(api: httpx.Client, upstream: LlamaServer) -> None:
    upstream.stop()
    health = api.get("/api/health").json()
    assert health["status"] == "unhealthy"
    entry = health["backends"]["llamacpp"]
    assert entry["available"] is False and entry["ready"] is False
    assert upstream.url in entry["details"]
    r = api.get("/health")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "backend_unavailable"
    for req in ({"messages": HELLO, "max_tokens": 2},
                {"messages": HELLO, "max_tokens": 2, "stream": True}):
        err = assert_openai_error(api.post(CHAT, json=req), 503, "backend_unavailable",
                                  "service_unavailable_error")
        assert upstream.url in err["message"]
    assert_openai_error(api.get("/v1/models"), 503, "backend_unavailable")
    # The rest of the API keeps answering.
    status = api.get("/status").json()
    assert status["upstream"]["available"] is False
    assert status["requests"]["rejected"] >= 2
    assert api.get("/vram").status_code == 200
    assert api.get("/metrics").status_code == 200
    assert api.get("/api/backend/info").json()["upstream"]["available"] is False

    upstream.start().wait_ready()
    assert api.get("/health").status_code == 200
    r = api.post(CHAT, json={"messages": HELLO, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


def test_killed_mid_stream_ends_the_stream_with_an_error(api: httpx.Client,
                                                          upstream: LlamaServer) -> None:
    req = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with api.stream("POST", "/v1/completions", json=req) as r:
        assert r.status_code == 200
        events = sse_events(r)
        for _ in range(2):
            assert "choices" in next(events)
        upstream.kill()
        rest = list(events)  # ends (the client's read timeout would fail it otherwise)
    assert rest[-1] == "[DONE]"
    errors = [e["error"] for e in rest[:-1] if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1, rest[-3:]
    assert errors[0]["code"] == "upstream_disconnected"
    assert upstream.url in errors[0]["message"]
    assert set(errors[0]) == {"message", "type", "param", "code"}
    assert api.get("/status").json()["requests"]["failed"] >= 1

    upstream.start().wait_ready()
    with api.stream("POST", CHAT, json={"messages": HELLO, "max_tokens": 3,
                                        "stream": True}) as r:
        assert r.status_code == 200
        assert list(sse_events(r))[-1] == "[DONE]"


# --- a fake upstream for the faults llama-server won't produce on demand ------------------------


FAKE_MODELS = {"object": "list", "data": [{"id": "fake.gguf", "object": "model", "created": 1,
                                           "owned_by": "llamacpp", "meta": {"n_embd": 8}}]}


class FakeLlamaServer(http.server.BaseHTTPRequestHandler):
    mode = "loading"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _json(self, status: int, data: Any, ctype: str = "application/json") -> None:
        body = data if isinstance(data, bytes) else json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.mode == "loading":
            self._json(503, {"error": {"code": 503, "message": "Loading model",
                                       "type": "unavailable_error"}})
        elif self.path == "/v1/models":
            self._json(200, FAKE_MODELS)
        elif self.path == "/health":
            self._json(200, {"status": "ok"})
        else:
            self._json(200, {})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.mode == "loading":
            self.do_GET()
        elif self.mode == "html":
            self._json(500, b"<html><body>proxy says oops</body></html>", "text/html")
        else:  # a stream: one event, then an error event, nothing, or more and [DONE]
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            words = ["Once", " upon", " a", " time"] if self.mode == "split" else ["Once"]
            body = b"".join(
                b"data: " + json.dumps({"choices": [{"index": 0, "text": w,
                                                     "finish_reason": None}],
                                        "model": "fake.gguf",
                                        "object": "text_completion"}).encode() + b"\n\n"
                for w in words)
            if self.mode == "error-event":
                body += b'data: {"error": {"code": 500, "message": "slot crashed", ' \
                        b'"type": "server_error"}}\n\n'
            if self.mode in ("split", "linger"):
                body += b"data: [DONE]\n\n"
            if self.mode == "split":  # cut everywhere, even inside "model": ..., and wait
                pieces = [body[i:i + 7] for i in range(0, len(body), 7)]
            else:
                pieces = [body]
            for piece in pieces:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
                if len(pieces) > 1:
                    time.sleep(0.002)
            if self.mode == "linger":  # the answer is whole; the end of the body comes late
                time.sleep(1.0)
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


@pytest.fixture(scope="module")
def fake() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeLlamaServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def fake_proxy(data_dir: Path, fake: str) -> Iterator[ServerProcess]:
    with ServerProcess(data_dir, env=proxy_env(fake)) as proc:
        yield proc.wait_ready(path="/api/health")


def fake_api(fake_proxy: ServerProcess, mode: str) -> httpx.Client:
    FakeLlamaServer.mode = mode
    return httpx.Client(base_url=fake_proxy.url, timeout=60)


def test_loading_upstream_is_503_loading(fake_proxy: ServerProcess) -> None:
    with fake_api(fake_proxy, "loading") as api:
        r = api.get("/health")
        assert r.status_code == 503
        assert r.json()["status"] == "loading"
        assert r.json()["error"]["code"] == "model_loading"
        health = api.get("/api/health").json()
        assert health["status"] == "loading"
        entry = health["backends"]["llamacpp"]
        assert entry["available"] is True and entry["ready"] is False
        assert "Loading model" in entry["details"]  # llama-server's own words
        r = api.post(CHAT, json={"messages": HELLO})
        assert_openai_error(r, 503, "model_loading", "service_unavailable_error")
        assert r.headers["retry-after"]


def test_error_event_mid_stream_is_converted(fake_proxy: ServerProcess) -> None:
    with fake_api(fake_proxy, "error-event") as api, \
            api.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True}) as r:
        events = list(sse_events(r))
    assert events[0]["choices"][0]["text"] == "Once"
    assert events[0]["model"] == "default"
    assert events[-1] == "[DONE]"
    err = events[-2]["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] == "llama-server: slot crashed" and err["type"] == "server_error"


def test_events_split_across_reads_are_relayed_whole(fake_proxy: ServerProcess) -> None:
    with fake_api(fake_proxy, "split") as api, \
            api.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True}) as r:
        raw = r.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    events = [json.loads(e[len(b"data: "):]) for e in raw.split(b"\n\n")[:-2]]
    assert "".join(e["choices"][0]["text"] for e in events) == "Once upon a time"
    assert {e["model"] for e in events} == {"default"}  # rewritten even when cut mid-field


def test_client_leaving_after_done_is_counted_completed(fake_proxy: ServerProcess) -> None:
    before = httpx.get(fake_proxy.url + "/status").json()["requests"]
    with fake_api(fake_proxy, "linger") as api, \
            api.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True}) as r:
        for line in r.iter_lines():
            if line == "data: [DONE]":
                break  # the answer is complete: hang up before llama-server ends its body
    fake_proxy.wait_log("POST /v1/completions 200")
    time.sleep(1.5)  # past the fake's linger: the relay has closed by now either way

    after = httpx.get(fake_proxy.url + "/status").json()["requests"]
    delta = {k: after[k] - before[k] for k in ("completed", "cancelled", "failed")}
    assert delta == {"completed": 1, "cancelled": 0, "failed": 0}, delta


def test_stream_ending_without_done_gets_an_error(fake_proxy: ServerProcess) -> None:
    with fake_api(fake_proxy, "no-done") as api, \
            api.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True}) as r:
        events = list(sse_events(r))
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "upstream_disconnected"


def test_non_json_upstream_error_keeps_its_status(fake_proxy: ServerProcess) -> None:
    with fake_api(fake_proxy, "html") as api:
        err = assert_openai_error(api.post(CHAT, json={"messages": HELLO}), 500)
        assert "proxy says oops" in err["message"]


# --- our server starting and supervising llama-server ------------------------------------------


def test_supervised_llama_server_is_restarted(data_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {**proxy_env(f"http://127.0.0.1:{port}"), "ML_OFFLOAD_N_CTX": "2048"}
    with ServerProcess(data_dir, args=["--llama-server-bin", str(llama_server_bin())],
                       env=env) as proc, httpx.Client(base_url=proc.url, timeout=120) as api:
        proc.wait_ready(timeout=240)
        sup = api.get("/api/backend/info").json()["supervisor"]
        assert sup["running"] and sup["restarts"] == 0
        args = sup["args"]
        assert args[args.index("-ngl") + 1] == str(sup["plan"]["n_gpu_layers"])
        assert args[args.index("-m") + 1] == api.get("/v1/models").json()["data"][0]["meta"][
            "path"]
        assert api.post("/v1/embeddings", json={"input": "hi"}).status_code == 200
        first = sup["pid"]

        os.kill(first, signal.SIGKILL)  # it crashes ...
        wait_for(lambda: api.get("/health").status_code == 503, timeout=120,
                 what="health to notice")

        def back() -> bool:  # ... and comes back as a new process
            s = api.get("/api/backend/info").json()["supervisor"]
            return bool(s["restarts"] == 1 and s["pid"] not in (None, first)
                        and api.get("/health").status_code == 200)

        wait_for(back, timeout=240, what="llama-server to be restarted")
        r = api.post(CHAT, json={"messages": HELLO, "max_tokens": 2})
        assert r.status_code == 200, r.text
        # The Gemma turn markup was rendered around the message (not a bare template name).
        assert r.json()["usage"]["prompt_tokens"] >= 8, r.json()["usage"]
        second = api.get("/status").json()["supervisor"]["pid"]
    # Stopping our server stops the llama-server it started.
    wait_for(lambda: not psutil.pid_exists(second)
             or psutil.Process(second).status() == psutil.STATUS_ZOMBIE,
             timeout=30, what="supervised llama-server to exit")
