"""Hardening checks that need no model: the real app in-process over the fake engine
(tests/fakes.py). What needs real sockets or llama.cpp is in test_hardening.py."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from fakes import Script, fast_app, leave_after
from mloffload.logs import MAX_LOG_MESSAGE, setup_logging
from test_fast_api import CHAT, USER, assert_error

pytestmark = pytest.mark.anyio

SECRET = "purple-elephant-prompt"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": SECRET + "\ud800"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff" + SECRET}]}]},
     "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": "hi", "name": "\ud800"}]}, "messages[0].name"),
    ({"messages": USER, "stop": ["\ud800"]}, "stop[0]"),
    ({"messages": USER, "model": "x\ud800"}, "model"),
])
async def test_lone_surrogates_are_a_400_naming_the_field(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, body: dict[str, object],
        param: str) -> None:
    # The JSON escape \ud800 is valid JSON but not Unicode text: nothing can encode it.
    import json

    raw = json.dumps(body).encode()
    async with fast_app(tmp_path) as fa:
        caplog.set_level(logging.INFO)
        r = await fa.client.post(CHAT, content=raw, headers={"Content-Type": "application/json"})
        err = assert_error(r, 400, "invalid_value", param)
        assert "surrogate" in err["message"]
        assert SECRET not in r.text
        assert (await fa.client.post(CHAT, json={"messages": USER})).status_code == 200
    assert SECRET not in caplog.text


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"prompt": "\ud800"}),
    ("/v1/completions", {"prompt": ["ok", "\ud800"][1:]}),
    ("/v1/embeddings", {"input": "\ud800"}),
    ("/v1/embeddings", {"input": ["fine", "bad\udc00"]}),
])
async def test_lone_surrogates_in_prompts_and_inputs(tmp_path: Path, path: str,
                                                     body: dict[str, object]) -> None:
    import json

    async with fast_app(tmp_path) as fa:
        r = await fa.client.post(path, content=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
        err = assert_error(r, 400, "invalid_value")
        assert err["param"] in ("prompt", "prompt[0]", "input", "input[1]"), err


async def test_an_engine_failure_logs_no_request_content(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # An unexpected exception whose message carries the prompt (as UnicodeEncodeError does).
    script = Script(fail=ValueError(f"cannot handle {SECRET * 1000}"))
    async with fast_app(tmp_path, script) as fa:
        caplog.set_level(logging.INFO)
        r = await fa.client.post(CHAT, json={"messages": [{"role": "user", "content": SECRET}]})
        assert_error(r, 500, "internal_error")
        assert SECRET not in r.text
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert errors, caplog.text
    assert all(SECRET not in rec.getMessage() and rec.exc_info is None for rec in errors)
    assert "ValueError" in errors[0].getMessage()  # the kind and the place, not the content


def _format(message: str, *args: object, json: bool = False, **extra: object) -> str:
    stream = io.StringIO()
    setup_logging("info", json)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    try:
        logging.getLogger("mloffload.test").info(message, *args, extra=extra)
    finally:
        logging.getLogger().handlers[:] = []
    return stream.getvalue()


@pytest.mark.parametrize("evil", [
    "/x\n2026-12-01T08:00:00 INFO mloffload.access: GET /admin 200",
    "/x\r2026-12-01T08:00:00 INFO forged",
    "/x\u2028forged", "/x\x1b[31mred", "/x\x85forged",
])
def test_log_lines_escape_control_characters(evil: str) -> None:
    out = _format("%s %s %d", "GET", evil, 404)
    assert out.count("\n") == 1 and out.endswith("\n"), out
    assert "\r" not in out and "\x1b" not in out and "\u2028" not in out and "\x85" not in out
    assert "forged" in out or "2026" in out or "red" in out  # escaped, not dropped


def test_log_lines_are_bounded() -> None:
    out = _format("prompt %s", "x" * 3_000_000)
    assert len(out) < MAX_LOG_MESSAGE + 200
    assert "more characters" in out
    data = _format("access", json=True, path="/" + "y" * 100_000)
    assert len(data) < 2 * MAX_LOG_MESSAGE


# --- abandoned and timed-out work ------------------------------------------------------

EMBED_40 = {"input": [f"text {i}" for i in range(40)]}


async def test_an_abandoned_embedding_stops_and_is_counted_once(tmp_path: Path) -> None:
    script = Script(delay=0.05)  # 2 s for all 40 inputs
    async with fast_app(tmp_path, script) as fa:
        sent = await leave_after(fa.app, "/v1/embeddings", EMBED_40, 0.3)
        assert all(m.get("status", 200) != 200 for m in sent if m["type"] ==
                   "http.response.start")
        counts = await fa.settle(lambda c: c["active"] == 0)
        assert (counts["cancelled"], counts["completed"], counts["failed"]) == (1, 0, 0)
        assert script.embedded[-1] < 40  # it stopped between inputs
        status = (await fa.client.get("/status")).json()["loaded_models"][0]
        assert status["slots"]["busy"] == 0
        r = await fa.client.post("/v1/embeddings", json={"input": "next"})
        assert r.status_code == 200
        counts = await fa.settle(lambda c: c["active"] == 0)
        assert (counts["cancelled"], counts["completed"]) == (1, 1)


async def test_an_abandoned_stream_and_chat_are_counted_once(tmp_path: Path) -> None:
    script = Script(pieces=tuple(f" w{i}" for i in range(100)), delay=0.02)
    async with fast_app(tmp_path, script) as fa:
        await leave_after(fa.app, CHAT, {"messages": USER, "stream": True}, 0.2)
        await leave_after(fa.app, CHAT, {"messages": USER}, 0.2)
        counts = await fa.settle(lambda c: c["active"] == 0)
        assert (counts["cancelled"], counts["completed"], counts["failed"]) == (2, 0, 0)
        assert counts["tokens_generated"] < 100


async def test_the_slot_is_held_until_the_worker_is_done(tmp_path: Path) -> None:
    # The worker cannot stop a prompt stage that blocks; the next request must wait for it
    # instead of being handed a slot whose thread is still busy.
    import asyncio
    import threading

    hold = threading.Event()
    script = Script(hold=hold)
    async with fast_app(tmp_path, script) as fa:
        leaving = asyncio.ensure_future(leave_after(fa.app, "/v1/embeddings", EMBED_40, 0.2))
        await leaving
        status = (await fa.client.get("/status")).json()
        assert status["loaded_models"][0]["slots"]["busy"] == 1
        assert status["requests"]["active"] == 1
        hold.set()
        counts = await fa.settle(lambda c: c["active"] == 0)
        assert counts["cancelled"] == 1


async def test_an_embedding_past_the_request_timeout_is_a_504(tmp_path: Path) -> None:
    script = Script(delay=0.05)
    async with fast_app(tmp_path, script, request_timeout=0.3) as fa:
        r = await fa.client.post("/v1/embeddings", json=EMBED_40)
        assert_error(r, 504, "request_timeout")
        counts = await fa.settle(lambda c: c["active"] == 0)
        assert (counts["failed"], counts["completed"]) == (1, 0)
        assert script.embedded[-1] < 40


async def test_queue_wait_is_reported_and_not_counted_against_the_timeout(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    script = Script(pieces=("a",) * 10, delay=0.05)  # 0.5 s per request
    async with fast_app(tmp_path, script, request_timeout=0.8) as fa:
        caplog.set_level(logging.INFO, "mloffload.access")
        replies = await asyncio.gather(*[fa.client.post(CHAT, json={"messages": USER})
                                         for _ in range(3)])
        assert [r.status_code for r in replies] == [200, 200, 200]  # 1.5 s in all
        waits = [float(rec.__dict__["queue_ms"]) for rec in caplog.records
                 if "queue_ms" in rec.__dict__]
        assert len(waits) == 3 and max(waits) > 500
        metrics = (await fa.client.get("/metrics")).text
        assert "mloffload_queue_wait_seconds_count 3.0" in metrics


# --- web pages: the Host rule and JSON for what changes state ---------------------------------


@pytest.mark.parametrize("host", ["rebind.attacker.example", "rebind.attacker.example:9000",
                                  "127.0.0.1.nip.io", "0.0.0.0:9000", "[2001:db8::1]:9000"])
async def test_a_foreign_host_is_403_on_a_loopback_bind(tmp_path: Path, host: str) -> None:
    async with fast_app(tmp_path) as fa:
        for method, path in (("GET", "/status"), ("GET", "/health"), ("GET", "/v1/models"),
                             ("POST", CHAT)):
            r = await fa.client.request(method, path, headers={"Host": host},
                                        json={"messages": USER} if method == "POST" else None)
            assert_error(r, 403, "host_not_allowed")
        assert (await fa.client.get("/status")).status_code == 200


@pytest.mark.parametrize("host", ["localhost", "localhost:9000", "127.0.0.1:9000",
                                  "127.1.2.3", "[::1]:9000", "LOCALHOST.", "app.localhost"])
async def test_loopback_hosts_are_answered(tmp_path: Path, host: str) -> None:
    async with fast_app(tmp_path) as fa:
        r = await fa.client.get("/status", headers={"Host": host})
        assert r.status_code == 200, r.text


async def test_allowed_hosts_adds_names(tmp_path: Path) -> None:
    async with fast_app(tmp_path, allowed_hosts=["gpu-box.lan"]) as fa:
        assert (await fa.client.get("/status", headers={"Host": "gpu-box.lan:9000"})
                ).status_code == 200
        assert_error(await fa.client.get("/status", headers={"Host": "other.lan"}), 403)
    async with fast_app(tmp_path / "any", allowed_hosts=["*"]) as fa:
        assert (await fa.client.get("/status", headers={"Host": "other.lan"})).status_code == 200


async def test_a_public_bind_with_a_key_checks_no_host(tmp_path: Path) -> None:
    async with fast_app(tmp_path, host="0.0.0.0", api_key="k") as fa:
        r = await fa.client.get("/status", headers={"Host": "gpu-box.lan",
                                                    "Authorization": "Bearer k"})
        assert r.status_code == 200


PAGE = [{"Origin": "https://rebind.attacker.example"}, {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"}]


@pytest.mark.parametrize("page", PAGE)
@pytest.mark.parametrize("headers", [{}, {"Content-Type": "text/plain"},
                                     {"Content-Type": "application/x-www-form-urlencoded"},
                                     {"Content-Type": "multipart/form-data; boundary=x"}])
@pytest.mark.parametrize("path", ["/api/models/default/unload", "/api/models/default/load",
                                  CHAT, "/v1/embeddings", "/api/generate"])
async def test_a_web_page_cannot_change_state_without_json(
        tmp_path: Path, page: dict[str, str], headers: dict[str, str], path: str) -> None:
    # What a web page can make a browser send across origins without a CORS preflight.
    async with fast_app(tmp_path) as fa:
        r = await fa.client.post(path, headers={**page, **headers},
                                 content=b"{}" if headers else b"")
        assert r.status_code == 415, r.text
        assert (await fa.client.get("/status")).json()["loaded_models"]  # still loaded


async def test_state_changes_with_json_or_the_key(tmp_path: Path) -> None:
    async with fast_app(tmp_path) as fa:
        r = await fa.client.post("/api/models/default/unload", json={})
        assert r.json() == {"unloaded": True, "id": "tiny"}
        # curl and scripts send no Origin: any type, or none, as Ollama's docs do (curl -d).
        r = await fa.client.post("/api/models/default/load", content=b"",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200, r.text
        assert (await fa.client.post("/api/models/default/unload")).status_code == 200
    async with fast_app(tmp_path / "keyed", api_key="k") as fa:
        key = {"Authorization": "Bearer k"}
        r = await fa.client.post("/api/models/default/unload", headers=key)
        assert r.status_code == 200, r.text
        r = await fa.client.post("/api/models/default/load", headers={
            **key, "Content-Type": "text/plain", "Origin": "https://app.example"}, content=b"x")
        assert r.status_code == 200, r.text  # the key is the proof
        r = await fa.client.post(CHAT, headers={**key, "Content-Type": "text/plain"},
                                 content=b"x")
        assert_error(r, 415, "unsupported_media_type")  # /v1/ takes JSON only


async def test_head_is_get_without_a_body(tmp_path: Path) -> None:
    async with fast_app(tmp_path) as fa:
        for path in ("/health", "/v1/models", "/status"):
            r = await fa.client.head(path)
            assert r.status_code == 200 and r.headers["content-type"] == "application/json"


# --- the model file changes on disk -------------------------------------------------------


async def test_readiness_follows_the_default_models_file(tmp_path: Path) -> None:
    from fakes import tiny_gguf

    async with fast_app(tmp_path) as fa:
        assert (await fa.client.post("/api/models/default/unload", json={})).status_code == 200
        fa.model_path.unlink()
        r = await fa.client.get("/health")
        err = assert_error(r, 503, "backend_unavailable")
        assert "tiny" in err["message"] and "missing" in err["message"]
        assert (await fa.client.get("/api/health")).json()["status"] == "unhealthy"
        card = (await fa.client.get("/v1/models")).json()["data"][0]
        assert card["meta"]["usable"] is False and "missing" in card["meta"]["reason"]
        assert_error(await fa.client.post(CHAT, json={"messages": USER}), 500, "model_unusable")
        fa.model_path.write_bytes(b"GGUF" + b"\0" * 100)  # back, but broken
        assert_error(await fa.client.get("/health"), 503, "backend_unavailable")
        tiny_gguf(fa.model_path, name="Tiny Again")  # back and good
        assert (await fa.client.get("/health")).status_code == 200
        assert (await fa.client.get("/v1/models")).json()["data"][0]["meta"]["usable"] is True
        assert (await fa.client.post(CHAT, json={"messages": USER})).status_code == 200


async def test_a_file_changed_under_an_idle_model_is_never_touched(tmp_path: Path) -> None:
    from fakes import tiny_gguf

    async with fast_app(tmp_path) as fa:
        assert (await fa.client.post(CHAT, json={"messages": USER})).status_code == 200
        manager = fa.app.state.backend.manager
        first = manager.loaded["tiny"].runner.engine
        with fa.model_path.open("r+b") as fh:  # truncated in place
            fh.truncate(fa.model_path.stat().st_size // 2)
        err = assert_error(await fa.client.post(CHAT, json={"messages": USER}), 500,
                           "model_unusable")
        assert "truncated" in err["message"]
        await fa.settle(lambda c: c["active"] == 0 and first.closed)
        assert "tiny" not in manager.loaded  # dropped, never used again
        tiny_gguf(fa.model_path, name="Tiny Two")  # a good file again
        assert (await fa.client.post(CHAT, json={"messages": USER})).status_code == 200
        second = manager.loaded["tiny"].runner.engine
        tiny_gguf(fa.model_path, name="Tiny Three, a longer name")  # replaced while loaded
        assert (await fa.client.post(CHAT, json={"messages": USER})).status_code == 200
        await fa.settle(lambda c: second.closed)
        assert manager.loaded["tiny"].runner.engine is not second


async def test_a_file_changed_while_requests_wait_is_a_503(tmp_path: Path) -> None:
    import asyncio
    import threading

    from fakes import tiny_gguf

    hold = threading.Event()
    async with fast_app(tmp_path, Script(hold=hold)) as fa:
        running = asyncio.ensure_future(fa.client.post(CHAT, json={"messages": USER}))
        await asyncio.get_running_loop().run_in_executor(None, fa.script.started.wait, 10)
        queued = asyncio.ensure_future(fa.client.post(CHAT, json={"messages": USER}))
        await fa.settle(lambda c: c["queued"] == 1)
        tiny_gguf(fa.model_path, name="Replaced While Busy")
        hold.set()
        assert (await running).status_code == 200  # it was running on the old file already
        r = await queued
        err = assert_error(r, 503, "model_file_changed")
        assert r.headers["retry-after"] == "1" and "tiny" in err["message"]
        await fa.settle(lambda c: c["active"] == 0)
        assert (await fa.client.post(CHAT, json={"messages": USER})).status_code == 200
        counts = await fa.settle(lambda c: c["active"] == 0)
        assert (counts["completed"], counts["failed"]) == (2, 1)


# --- small things ----------------------------------------------------------------------------


async def test_max_tokens_has_a_default_cap(tmp_path: Path) -> None:
    async with fast_app(tmp_path) as fa:
        for asked in (2**63, 10**30, 5000):
            r = await fa.client.post(CHAT, json={"messages": USER, "max_tokens": asked})
            assert r.status_code == 200
        r = await fa.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2**63})
        assert r.status_code == 200
        assert [p.max_tokens for p in fa.script.params] == [2048] * 4
    async with fast_app(tmp_path / "uncapped", max_tokens=0) as fa:
        await fa.client.post(CHAT, json={"messages": USER, "max_tokens": 5000})
        assert fa.script.params[-1].max_tokens == 5000


async def test_docs_work_offline(tmp_path: Path) -> None:
    async with fast_app(tmp_path) as fa:
        r = await fa.client.get("/docs")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "https://" not in r.text and "http://" not in r.text  # nothing from a CDN
        for path in ("/v1/chat/completions", "/v1/embeddings", "/openapi.json"):
            assert path in r.text
        assert (await fa.client.get("/openapi.json")).status_code == 200
