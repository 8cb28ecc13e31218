"""The llama-server backend against a real llama-server: every endpoint, streamed and not,
embeddings, models, health, errors, cancellation, and the official openai client."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from helpers import ServerProcess, assert_openai_error, free_port, sse_events
from llama_server import LlamaServer, proxy_env, running

REGISTRY_ID = "gemma-3-270m-q4_k_m"
CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Say hello in one sentence"}]
LONG_TOKENS = 1500  # far more than a test ever waits for: only a stopped upstream ends early


@pytest.fixture(scope="module")
def upstream(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    # --no-jinja: with Jinja on, "gemma" would be read as the template's literal text.
    args = ["--embeddings", "--pooling", "mean", "--no-jinja", "--chat-template", "gemma"]
    with running(model_path, tmp_path_factory.mktemp("llama-server"), free_port(),
                 args) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(data_dir: Path, upstream: LlamaServer) -> Iterator[ServerProcess]:
    with ServerProcess(data_dir, env=proxy_env(upstream.url)) as proc:
        yield proc.wait_ready()


@pytest.fixture
def api(proxy: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, timeout=120) as client:
        yield client
        deadline = time.monotonic() + 10  # a stream's relay closes just after its last byte
        while client.get("/status").json()["upstream"]["in_flight"] != 0:
            assert time.monotonic() < deadline, "a request was never released"
            time.sleep(0.05)


# --- health, models, info ------------------------------------------------------------------


def test_health_is_the_seeds_shape(api: httpx.Client) -> None:
    assert api.get("/health").json() == {"status": "ok"}
    body = api.get("/api/health").json()
    assert body["status"] == "healthy"
    assert body["backend"] == "llama-server"
    assert body["backends"] == {"llamacpp": {"available": True, "ready": True,
                                             "details": "llama-server is running and ready"}}
    assert api.get("/").json()["backend"] == "llama-server"


def test_models_merge_the_registry(api: httpx.Client, upstream: LlamaServer,
                                   model_path: Path) -> None:
    body = api.get("/v1/models").json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == REGISTRY_ID and card["object"] == "model"
    meta = card["meta"]
    # From our registry (the GGUF header), matched by the file llama-server serves ...
    assert meta["architecture"] == "gemma3"
    assert meta["embedding_length"] == 640
    assert meta["path"] == str(model_path)
    # ... and from llama-server itself.
    assert meta["upstream_id"] == str(model_path)
    assert meta["upstream"]["n_ctx"] == 2048
    assert "default" in meta["aliases"]
    assert api.get("/v1/models/default").json()["id"] == REGISTRY_ID
    assert api.get(f"/v1/models/{REGISTRY_ID}").json()["id"] == REGISTRY_ID
    assert_openai_error(api.get("/v1/models/nope"), 404, "model_not_found")


def test_backend_info_from_props(api: httpx.Client, model_path: Path) -> None:
    info = api.get("/api/backend/info").json()
    assert info["backend"] == "llama-server"
    up = info["upstream"]
    assert up["available"] and up["ready"]
    assert up["model_path"] == str(model_path)
    assert up["n_ctx"] == 2048
    assert isinstance(up["total_slots"], int) and up["total_slots"] >= 1
    assert up["slots_busy"] == 0
    assert info["default_model"]["id"] == REGISTRY_ID
    assert info["default_model"]["block_count"] == 18


# --- generation ------------------------------------------------------------------------------


def test_chat_non_stream(api: httpx.Client) -> None:
    r = api.post(CHAT, json={"model": "default", "messages": HELLO, "max_tokens": 8,
                             "temperature": 0.7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "default"  # the name asked for, not llama-server's file path
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert 0 < u["completion_tokens"] <= 8
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_chat_stream(api: httpx.Client) -> None:
    req = {"model": REGISTRY_ID, "messages": HELLO, "max_tokens": 6, "stream": True,
           "stream_options": {"include_usage": True}}
    with api.stream("POST", CHAT, json=req) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["model"] == REGISTRY_ID for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert 0 < usage["completion_tokens"] <= 6
    pieces = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
    assert len([p for p in pieces if p]) >= 1


def test_completion_defaults_to_16_tokens(api: httpx.Client) -> None:
    r = api.post("/v1/completions", json={"prompt": "Once upon a time", "temperature": 0,
                                          "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "default"
    assert body["choices"][0]["text"]
    assert body["usage"]["completion_tokens"] == 16  # OpenAI's default, not "until the end"


def test_completion_stream(api: httpx.Client) -> None:
    req = {"prompt": "1, 2, 3,", "max_tokens": 5, "stream": True, "temperature": 0,
           "ignore_eos": True}
    with api.stream("POST", "/v1/completions", json=req) as r:
        assert r.status_code == 200
        events = list(sse_events(r))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# --- embeddings ----------------------------------------------------------------------------------


def test_embeddings_string_and_list(api: httpx.Client) -> None:
    one = api.post("/v1/embeddings", json={"model": "default", "input": "Hello world"})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["object"] == "list" and body["model"] == "default"
    [item] = body["data"]
    assert item["index"] == 0 and len(item["embedding"]) == 640
    assert body["usage"]["prompt_tokens"] > 0

    many = api.post("/v1/embeddings", json={"input": ["Hello world", "Goodbye moon"]}).json()
    assert [d["index"] for d in many["data"]] == [0, 1]
    vecs = [d["embedding"] for d in many["data"]]
    assert all(len(v) == 640 for v in vecs)
    assert vecs[0] != vecs[1]  # one pooled vector per input
    assert vecs[0] == pytest.approx(item["embedding"], abs=1e-4)


def test_embeddings_base64_and_dimensions(api: httpx.Client) -> None:
    floats = api.post("/v1/embeddings", json={"input": "abc"}).json()["data"][0]["embedding"]
    b64 = api.post("/v1/embeddings", json={"input": "abc", "encoding_format": "base64"}).json()
    raw = base64.b64decode(b64["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(floats, abs=1e-4)
    r = api.post("/v1/embeddings", json={"input": "abc", "dimensions": 5})
    assert_openai_error(r, 400, "invalid_value", param="dimensions")


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nope", "../../etc/passwd", "/etc/passwd"])
def test_unknown_models_are_404(api: httpx.Client, name: str) -> None:
    r = api.post(CHAT, json={"model": name, "messages": HELLO, "max_tokens": 1})
    assert_openai_error(r, 404, "model_not_found", param="model")


def test_upstream_errors_keep_status_in_openai_shape(api: httpx.Client) -> None:
    # Too long for llama-server's context: its 400 comes back with our code for it.
    r = api.post("/v1/completions", json={"prompt": "word " * 3000, "max_tokens": 2})
    err = assert_openai_error(r, 400, "context_length_exceeded", "invalid_request_error")
    assert "context" in err["message"]
    # A llama-server-only field with a wrong type: rejected by llama-server, not by us.
    r = api.post("/v1/completions", json={"prompt": "x", "n_probs": "many"})
    err = assert_openai_error(r, 400)
    assert err["message"].startswith("llama-server: ") and "n_probs" in err["message"]
    # Our own validation still runs first.
    assert_openai_error(api.post(CHAT, json={"messages": []}), 400, param="messages")


# --- cancellation ---------------------------------------------------------------------------------


def test_closed_stream_stops_llama_server(api: httpx.Client, upstream: LlamaServer) -> None:
    before = upstream.wait_idle()
    req = {"prompt": "Once upon a time", "max_tokens": LONG_TOKENS, "ignore_eos": True,
           "stream": True}
    with api.stream("POST", "/v1/completions", json=req) as r:
        events = sse_events(r)
        for _ in range(3):
            assert next(events)["choices"][0]["text"] is not None
    # The client is gone; llama-server must stop well before LONG_TOKENS.
    after = upstream.wait_idle()
    made = after["tokens_predicted_total"] - before["tokens_predicted_total"]
    assert 3 <= made < LONG_TOKENS / 2, made
    status = api.get("/status").json()["requests"]
    assert status["cancelled"] >= 1 and status["active"] == 0


def test_client_leaving_non_stream_stops_llama_server(proxy: ServerProcess,
                                                      upstream: LlamaServer) -> None:
    before = upstream.wait_idle()
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": LONG_TOKENS,
                       "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    try:
        deadline = time.monotonic() + 120
        while upstream.decoding() < 3:
            assert time.monotonic() < deadline, "llama-server never started generating"
            time.sleep(0.1)
    finally:
        sock.close()  # the client leaves while llama-server generates the answer
    after = upstream.wait_idle()
    made = after["tokens_predicted_total"] - before["tokens_predicted_total"]
    assert made < LONG_TOKENS / 2, made


# --- the other endpoints in this mode -------------------------------------------------------------


def test_vram_status_metrics(api: httpx.Client, upstream: LlamaServer) -> None:
    with api.stream("POST", CHAT, json={"messages": HELLO, "max_tokens": 2,
                                        "stream": True}) as r:
        assert list(sse_events(r))[-1] == "[DONE]"
    vram = api.get("/vram")
    assert vram.status_code == 200
    assert "available" in vram.json()  # the machine's GPU memory, or a structured "no GPU"
    status = api.get("/status").json()
    assert status["backend"] == "llama-server"
    assert status["upstream"]["url"] == upstream.url
    assert status["upstream"]["ready"] is True
    assert [m["id"] for m in status["loaded_models"]] == [REGISTRY_ID]
    assert status["requests"]["completed"] >= 1
    assert status["requests"]["tokens_generated"] > 0
    assert "gpu" in status
    metrics = api.get("/metrics").text
    completed = _metric(metrics, 'mloffload_inference_requests_total{outcome="completed"}')
    assert completed >= 1
    ttft = _metric(metrics,
                   'mloffload_time_to_first_token_seconds_count{route="/v1/chat/completions"}')
    assert ttft >= 1


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


# --- the official openai client ----------------------------------------------------------------


@pytest.fixture
def client(proxy: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", timeout=120,
                         max_retries=0)


def test_openai_models_list(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [REGISTRY_ID]


def test_openai_chat(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="default", messages=[{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Hello"}], max_tokens=8)
    assert out.choices[0].message.role == "assistant"
    assert out.usage is not None and 0 < out.usage.completion_tokens <= 8


def test_openai_chat_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
        stream=True, stream_options={"include_usage": True})
    chunks: list[Any] = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and 0 < chunks[-1].usage.completion_tokens <= 8


def test_openai_completions(client: openai.OpenAI) -> None:
    out = client.completions.create(model="default", prompt="1, 2, 3,", max_tokens=4,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].text
    assert out.usage is not None and out.usage.completion_tokens == 4


def test_openai_embeddings(client: openai.OpenAI) -> None:
    out = client.embeddings.create(model="default", input=["one", "two"])  # base64 on the wire
    assert [len(d.embedding) for d in out.data] == [640, 640]
    out = client.embeddings.create(model="default", input="one", encoding_format="float")
    assert len(out.data[0].embedding) == 640


def test_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="default", prompt="word " * 3000, max_tokens=1)
    assert bad.value.code == "context_length_exceeded"


def test_token_default_and_cap_apply_in_front_of_llama_server(data_dir: Path,
                                                              upstream: LlamaServer) -> None:
    env = {**proxy_env(upstream.url), "ML_OFFLOAD_DEFAULT_MAX_TOKENS": "3",
           "ML_OFFLOAD_MAX_TOKENS": "5"}
    with ServerProcess(data_dir, env=env) as proc:
        proc.wait_ready()
        chat = httpx.post(proc.url + CHAT, json={"messages": HELLO, "temperature": 0},
                          timeout=120).json()
        assert chat["usage"]["completion_tokens"] == 3
        more = httpx.post(proc.url + CHAT, timeout=120,
                          json={"messages": HELLO, "temperature": 0, "max_tokens": 50}).json()
        assert more["usage"]["completion_tokens"] == 5


def test_concurrent_mixed_requests_all_complete_and_add_up(proxy: ServerProcess) -> None:
    """Many clients at once through the pooled transport: every answer whole, every request
    counted once as completed (a client that hangs up right after [DONE] is no cancel)."""
    n, at_once, max_tokens = 60, 20, 4

    async def one(client: httpx.AsyncClient, i: int) -> str:
        body: dict[str, Any] = {"prompt": f"Count {i}:", "max_tokens": max_tokens,
                                "temperature": 0}
        if i % 2:
            async with client.stream("POST", "/v1/completions",
                                     json={**body, "stream": True}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        return "done"  # and hang up at once
            return "no [DONE]"
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["finish_reason"])

    async def main() -> list[str]:
        sem = asyncio.Semaphore(at_once)
        async with httpx.AsyncClient(base_url=proxy.url, timeout=300) as client:
            async def limited(i: int) -> str:
                async with sem:
                    return await one(client, i)
            return await asyncio.gather(*(limited(i) for i in range(n)))

    before = httpx.get(proxy.url + "/status").json()["requests"]
    results = asyncio.run(main())
    assert sorted(set(results)) == ["done", "length"], results
    after = httpx.get(proxy.url + "/status").json()["requests"]
    delta = {k: after[k] - before[k] for k in ("total", "completed", "cancelled", "failed")}
    assert delta == {"total": n, "completed": n, "cancelled": 0, "failed": 0}, delta
    assert after["tokens_generated"] - before["tokens_generated"] == n * max_tokens


def test_max_queue_bounds_what_waits_in_llama_server(data_dir: Path,
                                                     upstream: LlamaServer) -> None:
    """As in-process: past llama-server's slots plus ML_OFFLOAD_MAX_QUEUE waiting, a 429 in
    OpenAI's shape with Retry-After; everything admitted completes; the count returns to 0."""
    env = {**proxy_env(upstream.url), "ML_OFFLOAD_MAX_QUEUE": "1"}
    with ServerProcess(data_dir, env=env) as proc:
        proc.wait_ready()
        slots = httpx.get(proc.url + "/api/backend/info").json()["upstream"]["total_slots"]
        admitted = slots + 1
        n = 3 * admitted

        async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
            return await client.post("/v1/completions", json={
                "prompt": f"Story {i}:", "max_tokens": 48, "temperature": 0,
                "ignore_eos": True})

        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=proc.url, timeout=300) as client:
                return await asyncio.gather(*(one(client, i) for i in range(n)))

        responses = asyncio.run(main())
        ok = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code != 200]
        assert ok and refused and len(ok) + len(refused) == n
        assert len(ok) >= admitted, [r.status_code for r in responses]
        for r in refused:
            err = assert_openai_error(r, 429, "rate_limit_exceeded")
            assert "max_queue 1" in err["message"]
            assert int(r.headers["retry-after"]) >= 1
        assert all(r.json()["usage"]["completion_tokens"] == 48 for r in ok)
        status = httpx.get(proc.url + "/status").json()
        assert status["upstream"]["in_flight"] == 0 and status["upstream"]["slots"] == slots
        assert status["requests"]["rejected"] == len(refused)
        assert status["requests"]["completed"] == len(ok)
        again = httpx.post(proc.url + "/v1/completions", timeout=120,
                           json={"prompt": "Again", "max_tokens": 2})
        assert again.status_code == 200
