"""Bad input on purpose: each gets the documented OpenAI-shaped error, and the server goes on."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from helpers import assert_openai_error

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]

JSON_CASES: list[tuple[str, str, dict[str, Any], int, str | None, str | None]] = [
    # (name, path, body, status, code, param)
    ("empty messages", CHAT, {"messages": []}, 400, "invalid_value", "messages"),
    ("missing messages", CHAT, {"model": "default"}, 400, "invalid_value", "messages"),
    ("messages not a list", CHAT, {"messages": "hi"}, 400, "invalid_value", "messages"),
    ("unknown role", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "invalid_value", "messages[0].role"),
    ("content wrong type", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400,
     "invalid_value", None),
    ("negative max_tokens", CHAT, {"messages": USER, "max_tokens": -1}, 400, "invalid_value",
     "max_tokens"),
    ("zero max_tokens", CHAT, {"messages": USER, "max_tokens": 0}, 400, "invalid_value",
     "max_tokens"),
    ("max_tokens a string", CHAT, {"messages": USER, "max_tokens": "many"}, 400,
     "invalid_value", "max_tokens"),
    ("temperature too high", CHAT, {"messages": USER, "temperature": 9}, 400, "invalid_value",
     "temperature"),
    ("top_p zero", CHAT, {"messages": USER, "top_p": 0}, 400, "invalid_value", "top_p"),
    ("n of 2", CHAT, {"messages": USER, "n": 2}, 400, "invalid_value", "n"),
    ("too many stops", CHAT, {"messages": USER, "stop": ["a"] * 17}, 400, "invalid_value",
     "stop"),
    ("stream not a bool", CHAT, {"messages": USER, "stream": "yes please"}, 400,
     "invalid_value", "stream"),
    ("seed too big", CHAT, {"messages": USER, "seed": 2**70}, 400, "invalid_value", "seed"),
    ("body is a list", CHAT, [1, 2], 400, "invalid_body", None),  # type: ignore[list-item]
    ("unknown model", CHAT, {"model": "gpt-17", "messages": USER}, 404, "model_not_found",
     "model"),
    ("path-like model", CHAT, {"model": "../../etc/passwd", "messages": USER}, 404,
     "model_not_found", "model"),
    ("absolute path model", CHAT, {"model": "/etc/passwd", "messages": USER}, 404,
     "model_not_found", "model"),
    ("bad keep_alive", CHAT, {"messages": USER, "keep_alive": "soon"}, 400, "invalid_value",
     "keep_alive"),
    ("completion without prompt", "/v1/completions", {"max_tokens": 3}, 400, "invalid_value",
     "prompt"),
    ("two prompts", "/v1/completions", {"prompt": ["a", "b"]}, 400, "invalid_value", "prompt"),
    ("empty embedding input", "/v1/embeddings", {"input": []}, 400, "invalid_value", "input"),
    ("empty embedding string", "/v1/embeddings", {"input": ""}, 400, "invalid_value", "input"),
    ("embedding wrong dims", "/v1/embeddings", {"input": "x", "dimensions": 12}, 400,
     "invalid_value", "dimensions"),
    ("embedding bad format", "/v1/embeddings", {"input": "x", "encoding_format": "hex"}, 400,
     "invalid_value", "encoding_format"),
    ("embedding unknown model", "/v1/embeddings", {"input": "x", "model": "nope"}, 404,
     "model_not_found", "model"),
]


@pytest.mark.parametrize(("name", "path", "body", "status", "code", "param"), JSON_CASES,
                         ids=[c[0] for c in JSON_CASES])
def test_bad_json_body(base_url: str, name: str, path: str, body: Any, status: int,
                       code: str | None, param: str | None) -> None:
    r = httpx.post(base_url + path, json=body, timeout=60)
    assert_openai_error(r, status, code=code, param=param)


def test_malformed_json(base_url: str) -> None:
    r = httpx.post(base_url + CHAT, content=b'{"messages": [', timeout=30,
                   headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400, code="invalid_json", type_="invalid_request_error")


def test_wrong_content_type(base_url: str) -> None:
    r = httpx.post(base_url + CHAT, content=b"messages=hi", timeout=30,
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_openai_error(r, 415, code="unsupported_media_type")


def test_over_long_prompt(base_url: str) -> None:
    # The session server runs with n_ctx 2048.
    r = httpx.post(base_url + CHAT, json={"messages": [{"role": "user",
                                                          "content": "word " * 3000}]},
                   timeout=120)
    err = assert_openai_error(r, 400, code="context_length_exceeded", param="messages")
    assert "2048" in err["message"]
    r = httpx.post(base_url + "/v1/embeddings", json={"input": "word " * 3000}, timeout=120)
    assert_openai_error(r, 400, code="context_length_exceeded", param="input")


def test_huge_max_tokens_is_capped_by_context(base_url: str) -> None:
    r = httpx.post(base_url + "/v1/completions", json={
        "prompt": "1, 2, 3,", "max_tokens": 10**12, "temperature": 0, "stop": [" 6"]},
        timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_unknown_endpoint_and_method(base_url: str) -> None:
    assert_openai_error(httpx.get(base_url + "/v2/nothing"), 404, type_="not_found_error")
    assert_openai_error(httpx.get(base_url + CHAT), 405)


def test_server_keeps_serving_after_bad_input(base_url: str) -> None:
    for _ in range(3):
        httpx.post(base_url + CHAT, content=b"\xff\xfe garbage", timeout=30,
                   headers={"Content-Type": "application/json"})
    r = httpx.post(base_url + CHAT, json={"messages": USER, "max_tokens": 3}, timeout=60)
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("raw", ["NaN", '"nan"', "Infinity", '"-inf"'])
def test_non_finite_keep_alive_is_400_and_counters_stay_exact(base_url: str, raw: str) -> None:
    body = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "keep_alive": ' \
        + raw + "}"
    r = httpx.post(base_url + CHAT, content=body.encode(), timeout=60,
                   headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400, code="invalid_value", param="keep_alive")
    before = httpx.get(base_url + "/status", timeout=10).json()["requests"]
    assert httpx.post(base_url + CHAT, json={"messages": USER, "max_tokens": 2},
                      timeout=60).status_code == 200
    after = httpx.get(base_url + "/status", timeout=10).json()["requests"]
    assert after["active"] == 0 and after["completed"] == before["completed"] + 1
