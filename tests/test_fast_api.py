"""Routing, errors and schemas in milliseconds: the real app in-process over a fake engine
(tests/fakes.py). The real-server tests (test_api.py, test_bad_input.py, ...) stay the
reference; these check the same contracts without a model or a socket."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fakes import Script, fast_app

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def assert_error(r: Any, status: int, code: str | None = None, param: str | None = None
                 ) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["message"] and "Traceback" not in err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return dict(err)


async def test_root_health_and_models(tmp_path: Path) -> None:
    async with fast_app(tmp_path) as fa:
        assert (await fa.client.get("/")).json()["backend"] == "llamacpp"
        assert (await fa.client.get("/health")).json() == {"status": "ok"}
        models = (await fa.client.get("/v1/models")).json()["data"]
        assert [m["id"] for m in models] == ["tiny"]
        assert "default" in models[0]["meta"]["aliases"]
        assert (await fa.client.get("/v1/models/default")).json()["id"] == "tiny"


async def test_chat_completion_and_counters(tmp_path: Path) -> None:
    async with fast_app(tmp_path) as fa:
        r = await fa.client.post(CHAT, json={"messages": USER})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == "Hello there!"
        assert body["usage"]["completion_tokens"] == 3
        counts = await fa.settle(lambda c: c["active"] == 0)
        assert counts["completed"] == 1 and counts["failed"] == 0


async def test_stream_event_order(tmp_path: Path) -> None:
    async with fast_app(tmp_path) as fa:
        r = await fa.client.post(CHAT, json={"messages": USER, "stream": True,
                                             "stream_options": {"include_usage": True}})
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(c["choices"][0]["delta"].get("content", "")
                       for c in chunks if c["choices"]) == "Hello there!"
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
        assert chunks[-1]["usage"]["completion_tokens"] == 3


async def test_completion_and_embeddings(tmp_path: Path) -> None:
    async with fast_app(tmp_path) as fa:
        r = await fa.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.json()["choices"][0] == {"index": 0, "text": "Hello there", "logprobs": None,
                                          "finish_reason": "length"}
        r = await fa.client.post("/v1/embeddings", json={"input": ["a", "b c"]})
        data = r.json()["data"]
        assert [d["index"] for d in data] == [0, 1] and len(data[0]["embedding"]) == 8


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    ({"messages": []}, 400, "invalid_value", "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value",
     "messages[0].role"),
    ({"messages": USER, "temperature": 9}, 400, "invalid_value", "temperature"),
    ({"messages": USER, "keep_alive": "soon"}, 400, "invalid_value", "keep_alive"),
    ({"model": "gpt-17", "messages": USER}, 404, "model_not_found", "model"),
    ({"model": "../../etc/passwd", "messages": USER}, 404, "model_not_found", "model"),
])
async def test_validation_errors_name_the_field(tmp_path: Path, body: dict[str, Any],
                                                status: int, code: str, param: str) -> None:
    async with fast_app(tmp_path) as fa:
        assert_error(await fa.client.post(CHAT, json=body), status, code, param)


async def test_malformed_json_wrong_method_and_unknown_path(tmp_path: Path) -> None:
    async with fast_app(tmp_path) as fa:
        r = await fa.client.post(CHAT, content=b'{"messages": [',
                                 headers={"Content-Type": "application/json"})
        assert_error(r, 400, "invalid_json")
        assert_error(await fa.client.get(CHAT), 405)
        assert_error(await fa.client.get("/v2/nothing"), 404)
        r = await fa.client.post(CHAT, content=b"messages=hi",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert_error(r, 415, "unsupported_media_type")


async def test_engine_failure_is_a_clear_500_and_the_app_goes_on(tmp_path: Path) -> None:
    script = Script(fail=RuntimeError("boom"))
    async with fast_app(tmp_path, script) as fa:
        assert_error(await fa.client.post(CHAT, json={"messages": USER}), 500, "internal_error")
        script.fail = None
        assert (await fa.client.post(CHAT, json={"messages": USER})).status_code == 200
        counts = await fa.settle(lambda c: c["active"] == 0)
        assert (counts["failed"], counts["completed"]) == (1, 1)


@pytest.mark.parametrize("raw", ['NaN', '"nan"', '"NaN"', 'Infinity', '-Infinity', '1e999',
                                 '"inf"', '"-inf"', '"1e999s"'])
async def test_keep_alive_must_be_finite(tmp_path: Path, raw: str) -> None:
    body = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "keep_alive": ' \
        + raw + "}"
    async with fast_app(tmp_path) as fa:
        r = await fa.client.post(CHAT, content=body.encode(),
                                 headers={"Content-Type": "application/json"})
        assert_error(r, 400, "invalid_value", "keep_alive")
        ok = await fa.client.post(CHAT, json={"messages": USER, "keep_alive": "1h"})
        assert ok.status_code == 200
        counts = await fa.settle(lambda c: c["active"] == 0)
        assert counts["completed"] == 1 and counts["total"] == counts["completed"] + \
            counts["failed"]
        loaded = (await fa.client.get("/status")).json()["loaded_models"]
        assert loaded[0]["keep_alive_seconds"] == 3600  # the idle unload is still scheduled
        assert loaded[0]["keep_alive_left_seconds"] > 3500


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "presence_penalty",
                                   "frequency_penalty", "repeat_penalty"])
async def test_sampling_numbers_must_be_finite(tmp_path: Path, field: str) -> None:
    body = '{"messages": [{"role": "user", "content": "hi"}], "' + field + '": NaN}'
    async with fast_app(tmp_path) as fa:
        r = await fa.client.post(CHAT, content=body.encode(),
                                 headers={"Content-Type": "application/json"})
        assert_error(r, 400, "invalid_value", field)
