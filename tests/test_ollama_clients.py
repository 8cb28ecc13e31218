"""The exact requests Neovim plugins send to Ollama, replayed against ml-offload in every
backend mode, and read back the way their parsers read them.

- codecompanion.nvim, ``lua/codecompanion/adapters/http/ollama/{init,get_models}.lua``: the
  model list is ``GET /api/tags`` then ``POST /api/show {"model"}`` per model (it reads
  ``capabilities``); a chat is ``POST /api/chat`` with ``stream: true``, ``think: false`` and
  ``options``; every streamed line must carry ``message`` (role, content), and the token
  count comes from the line with ``prompt_eval_count`` and ``eval_count``.
- avante.nvim, ``lua/avante/providers/ollama.lua``: ``POST /api/chat`` with ``stream: true``,
  ``keep_alive: "5m"``, its ``extra_request_body`` merged in (users put ``options.num_ctx``
  there), a ``system`` or ``developer`` first message; it appends ``message.content`` and stops
  at ``done``; its model list reads ``name``, ``digest`` and ``details``; its error handler
  reads ``error`` as a string.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ollama_backends import BACKENDS, N_CTX, Served, each_backend

JSON = {"Content-Type": "application/json", "Accept": "application/json"}
SYSTEM = "You are an AI programming assistant named \"CodeCompanion\"."
ASK = "Explain what a Lua table is in one sentence."


@pytest.fixture(scope="module", params=list(BACKENDS))
def api(request: pytest.FixtureRequest, data_dir: Path, model_path: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from each_backend(request, data_dir, model_path, tmp_path_factory)


def stream_lines(api: Served, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST /api/chat as curl does for these plugins, split into lines as they split it."""
    with api.http.stream("POST", "/api/chat", content=json.dumps(body), headers=JSON) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line) for line in r.iter_lines() if line]


# --- codecompanion.nvim ---------------------------------------------------------------------


def test_codecompanion_lists_models_and_reads_capabilities(api: Served) -> None:
    listing = api.http.get("/api/tags", headers={"content-type": "application/json"}).json()
    names = [m["name"] for m in listing["models"]]
    assert "default" in names
    for name in names:
        shown = api.http.post("/api/show", content=json.dumps({"model": name}),
                              headers={"content-type": "application/json"})
        assert shown.status_code == 200
        capabilities = shown.json()["capabilities"]
        # can_reason and has_vision: neither here, so it sends think = false, no images.
        assert "thinking" not in capabilities and "vision" not in capabilities


def test_codecompanion_streamed_chat(api: Served) -> None:
    body = {"model": "default", "stream": True, "think": False,
            "options": {"temperature": 0, "num_ctx": N_CTX, "num_predict": 16},
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": ASK}]}
    lines = stream_lines(api, body)
    text = ""
    tokens = None
    for line in lines:
        message = line["message"]  # chat_output returns nil without it
        assert message["role"] == "assistant"
        text += message["content"]
        if line.get("prompt_eval_count") is not None and line.get("eval_count") is not None:
            tokens = line["prompt_eval_count"] + line["eval_count"]
    assert text.strip()
    assert lines[-1]["done"] is True
    assert tokens is not None and tokens > lines[-1]["eval_count"] > 0


def test_codecompanion_not_streamed_inline(api: Served) -> None:
    """Inline edits turn streaming off and read ``message.content`` from the body."""
    body = {"model": "default", "stream": False, "think": False,
            "options": {"temperature": 0, "num_predict": 16},
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": ASK}]}
    r = api.http.post("/api/chat", content=json.dumps(body), headers=JSON)
    assert r.status_code == 200
    assert r.json()["message"]["content"].strip()
    streamed = "".join(line["message"]["content"] for line in
                       stream_lines(api, {**body, "stream": True}))
    assert streamed == r.json()["message"]["content"]


# --- avante.nvim ----------------------------------------------------------------------------


@pytest.mark.parametrize("first_role", ["system", "developer"])
def test_avante_streamed_chat(api: Served, first_role: str) -> None:
    body = {"model": "default", "stream": True, "keep_alive": "5m",
            "messages": [{"role": first_role, "content": "You are a coding assistant."},
                         {"role": "user", "content": ASK}],
            # extra_request_body as avante users set it, keep_alive inside options and all
            "options": {"num_ctx": N_CTX, "keep_alive": "5m", "temperature": 0,
                        "num_predict": 16}}
    chunks, stopped = [], False
    for line in stream_lines(api, body):
        assert not stopped, "a line after done"
        if line.get("message") and line["message"].get("content"):
            chunks.append(line["message"]["content"])
        if line.get("done"):
            stopped = True
    assert stopped and "".join(chunks).strip()


def test_avante_older_body_with_system_field(api: Served) -> None:
    """Earlier avante versions also sent ``system`` beside the messages."""
    body = {"model": "default", "stream": True, "keep_alive": "5m", "system": "Be brief.",
            "messages": [{"role": "user", "content": ASK}],
            "options": {"num_predict": 8}}
    assert stream_lines(api, body)[-1]["done"] is True


def test_avante_model_list(api: Served) -> None:
    listing = api.http.get("/api/tags", headers=JSON).json()
    for model in listing["models"]:
        details = model["details"]
        display = ", ".join(str(details[k]) for k in ("family", "parameter_size",
                                                      "quantization_level") if details.get(k))
        assert model["name"] and model["digest"] and display.count(",") == 2


def test_avante_reads_the_error_as_a_string(api: Served) -> None:
    body = {"model": "not-pulled:7b", "stream": True, "keep_alive": "5m",
            "messages": [{"role": "user", "content": ASK}]}
    r = api.http.post("/api/chat", content=json.dumps(body), headers=JSON)
    assert r.status_code == 404
    error = json.loads(r.text)["error"]
    assert isinstance(error, str) and "not-pulled:7b" in error
