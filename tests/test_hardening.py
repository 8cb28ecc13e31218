"""What hostile or clumsy clients and a broken disk do to a real server (issue 19): each test
reproduces one break against a real server on a free port, with the real model and real
sockets. Checks that need neither are in test_fast_hardening.py."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from helpers import ServerProcess, assert_openai_error, wait_for

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


# --- abandoned, timed-out and oversized work ---------------------------------------------------

WORDS_380 = " ".join(["word"] * 380)


def counters(proc: ServerProcess) -> dict[str, int]:
    return dict(httpx.get(proc.url + "/status", timeout=30).json()["requests"])


def settle(proc: ServerProcess, check: Callable[[dict[str, int]], bool]) -> dict[str, int]:
    """The request counters once ``check`` holds for them."""
    def settled() -> dict[str, int] | None:
        counts = counters(proc)
        return counts if check(counts) else None

    return wait_for(settled, timeout=120, what="the request counters",
                    details=lambda: str(counters(proc)))


def test_an_abandoned_embedding_stops_and_frees_its_slot(srv: ServerProcess) -> None:
    before = counters(srv)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/embeddings", json={"input": [WORDS_380] * 10}, timeout=2)
    after = settle(srv, lambda c: c["cancelled"] == before["cancelled"] + 1)
    assert after["active"] == 0 and after["failed"] == before["failed"]
    model = httpx.get(srv.url + "/status", timeout=30).json()["loaded_models"][0]
    assert model["slots"]["busy"] == 0
    r = httpx.post(srv.url + CHAT, json={"messages": USER, "max_tokens": 4}, timeout=120)
    assert r.status_code == 200
    assert settle(srv, lambda c: c["active"] == 0)["completed"] == before["completed"] + 1


def test_an_embedding_past_the_request_timeout_is_a_504(data_dir: Path) -> None:
    with ServerProcess(data_dir, env={"ML_OFFLOAD_REQUEST_TIMEOUT": "2s",
                                      "ML_OFFLOAD_N_CTX": "1024"}) as proc:
        proc.wait_ready()
        r = httpx.post(proc.url + "/v1/embeddings", json={"input": [WORDS_380] * 10},
                       timeout=120)
        assert_openai_error(r, 504, code="request_timeout")
        counts = settle(proc, lambda c: c["active"] == 0)
        assert (counts["failed"], counts["completed"]) == (1, 0)


def test_one_embedding_request_has_bounded_memory(data_dir: Path) -> None:
    with ServerProcess(data_dir, env={"ML_OFFLOAD_N_CTX": "4096"}) as proc:
        proc.wait_ready()
        small = httpx.post(proc.url + "/v1/embeddings", json={"input": "hello"}, timeout=60)
        assert small.status_code == 200
        before = proc.rss()
        r = httpx.post(proc.url + "/v1/embeddings", json={"input": "word " * 2000},
                       timeout=300)
        assert r.status_code == 200, r.text
        grown = proc.rss() - before
        # Logits for a whole 2000-token batch were 4 GB; batches within 128 MiB of them now.
        assert grown < 600 * 1024**2, grown
        r = httpx.post(proc.url + "/v1/embeddings", json={"input": "word " * 2100},
                       timeout=300)
        assert_openai_error(r, 400, code="context_length_exceeded", param="input")


# --- the engine itself: cancel within a prompt, and size checks before tokenizing ----------------


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[object]:
    from mloffload.engine.llamacpp import LlamaCppEngine, LoadOptions
    from mloffload.models.gguf_info import read_gguf_info

    eng = LlamaCppEngine("gemma", read_gguf_info(model_path), LoadOptions(n_ctx=4096))
    yield eng
    eng.close()


def test_a_cancelled_prompt_stops_within_its_first_batch(engine: object) -> None:
    import threading

    from mloffload.engine.base import GenerationResult, SamplingParams
    from mloffload.engine.llamacpp import LlamaCppEngine

    assert isinstance(engine, LlamaCppEngine)
    prompt = "word " * 3000
    cancel = threading.Event()
    cancel.set()  # the client has already left when the prompt starts
    result = GenerationResult()
    pieces = list(engine.complete(prompt, SamplingParams(max_tokens=4, seed=1), result, cancel))
    assert pieces == [] and result.finish_reason == "cancelled"
    assert result.prompt_tokens > 3000
    # llama.cpp aborted the first 512-token batch: none of the prompt is in the cache.
    assert engine._llm.n_tokens < 512
    # ... and the engine serves the next request normally.
    result = GenerationResult()
    text = "".join(engine.complete("1, 2, 3,", SamplingParams(max_tokens=4, temperature=0),
                                   result, threading.Event()))
    assert text and result.finish_reason in ("stop", "length")


def test_a_cancelled_embedding_raises_cancelled(engine: object) -> None:
    import threading

    from mloffload.engine.base import Cancelled
    from mloffload.engine.llamacpp import LlamaCppEngine

    assert isinstance(engine, LlamaCppEngine)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        engine.embed([WORDS_380] * 3, cancel)
    assert len(engine.embed(["still works"]).vectors) == 1


def test_an_oversized_prompt_is_refused_by_its_size(engine: object) -> None:
    import threading

    from mloffload.engine.base import ContextLengthError, GenerationResult, SamplingParams
    from mloffload.engine.llamacpp import LlamaCppEngine

    assert isinstance(engine, LlamaCppEngine)
    messages = [{"role": "user", "content": "x" * 1900}] * 2048  # 3.9 MB
    with pytest.raises(ContextLengthError, match="at least") as info:
        engine.chat(messages, SamplingParams(), GenerationResult(), threading.Event())
    assert info.value.param == "messages" and "4096" in str(info.value)
    with pytest.raises(ContextLengthError, match="at least"):
        engine.embed(["fine", "word " * 100_000])


def test_chunked_embeddings_match_one_batch(engine: object) -> None:
    import numpy as np

    from mloffload.engine.llamacpp import LlamaCppEngine

    assert isinstance(engine, LlamaCppEngine)
    text = "The quick brown fox jumps over the lazy dog. " * 20  # about 220 tokens
    chunked = np.array(engine.embed([text]).vectors[0])
    assert abs(float(np.linalg.norm(chunked)) - 1.0) < 1e-6
    # The same input in one batch, pooled by llama.cpp itself, as before.
    import llama_cpp
    from llama_cpp import _internals as internals

    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 512
    params.embeddings = True
    params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
    ctx = internals.LlamaContext(model=engine._llm._model, params=params, verbose=False)
    batch = internals.LlamaBatch(n_tokens=512, embd=0, n_seq_max=1, verbose=False)
    tokens = engine._llm.tokenize(text.encode(), add_bos=True, special=True)
    batch.add_sequence(tokens, 0, True)
    ctx.decode(batch)
    ref = np.array(llama_cpp.llama_get_embeddings_seq(ctx.ctx, 0)[:640])
    ctx.close()
    batch.close()
    ref /= np.linalg.norm(ref)
    assert float(ref @ chunked) > 0.9999


# --- a model file truncated in place while loaded ---------------------------------------------


@pytest.fixture
def own_model(tmp_path: Path, model_path: Path) -> Path:
    """A copy of the model this test may damage (the session's stays whole)."""
    import shutil

    copy = tmp_path / "models" / "mine.gguf"
    copy.parent.mkdir()
    shutil.copyfile(model_path, copy)
    return copy


def test_a_model_truncated_while_loaded_does_not_kill_the_server(
        tmp_path: Path, own_model: Path) -> None:
    env = {"ML_OFFLOAD_N_CTX": "512", "ML_OFFLOAD_DEFAULT_MODEL": str(own_model)}
    with ServerProcess(tmp_path / "data", env=env) as proc:
        proc.wait_ready()
        assert httpx.post(proc.url + CHAT, json={"messages": USER, "max_tokens": 2},
                          timeout=120).status_code == 200
        with own_model.open("r+b") as fh:
            fh.truncate(own_model.stat().st_size // 2)
        r = httpx.post(proc.url + CHAT, json={"messages": USER, "max_tokens": 2}, timeout=120)
        err = assert_openai_error(r, 500, code="model_unusable")
        assert "truncated" in err["message"]
        assert_openai_error(httpx.get(proc.url + "/health", timeout=30), 503,
                            code="backend_unavailable")
        status = httpx.get(proc.url + "/status", timeout=30).json()
        assert status["loaded_models"] == []
        assert proc.proc.poll() is None  # alive: no SIGBUS
        log = proc.log()
    assert "its file changed on disk" in log and "Traceback" not in log


def test_the_fallback_never_touches_a_changed_model(tmp_path: Path, own_model: Path) -> None:
    import threading

    from mloffload.engine.base import GenerationResult
    from mloffload.nvim.fallback import Fallback, FallbackUnavailable

    fb = Fallback(model=str(own_model), data_dir=tmp_path / "data", environ={})
    try:
        hi = [{"role": "user", "content": "hi"}]
        text = "".join(fb.chat(hi, {"max_tokens": 2}, GenerationResult(), threading.Event()))
        assert text and fb.loaded
        with own_model.open("r+b") as fh:
            fh.truncate(own_model.stat().st_size // 2)
        with pytest.raises(FallbackUnavailable, match="truncated"):
            "".join(fb.chat(hi, {"max_tokens": 2}, GenerationResult(), threading.Event()))
        assert not fb.loaded
    finally:
        fb.close()


def test_sigterm_closes_the_registry(tmp_path: Path, data_dir: Path) -> None:
    from test_registry import prepared_data

    data = prepared_data(tmp_path, data_dir)
    proc = ServerProcess(data, env={"ML_OFFLOAD_N_CTX": "512"})
    try:
        proc.wait_ready()
        assert (data / "registry.sqlite3-wal").exists()  # open, in WAL mode
        proc.proc.terminate()  # what systemd sends
        proc.proc.wait(60)
        log = proc.log()
    finally:
        proc.stop()
    assert not (data / "registry.sqlite3-wal").exists()  # checkpointed and closed
    assert "registry closed" in log
