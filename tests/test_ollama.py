"""Ollama's API against a real server on the real model, in every backend mode: the official
``ollama`` client, the NDJSON framing and byte shapes that clients parse by hand, lifecycle
(load, keep_alive 0), the errors, and the second listener."""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import psutil
import pytest

from helpers import ServerProcess, assert_openai_error, free_port, machine_gpu
from llama_server import LlamaServer, proxy_env
from mloffload.config import ConfigError, load_settings
from mloffload.models.gguf_info import GGUFInfo, read_gguf_info
from ollama_backends import BACKENDS, LLAMA_SERVER_ARGS, N_CTX, Served, each_backend, ndjson

HELLO = [{"role": "user", "content": "Say hello in one sentence"}]
GREEDY = {"temperature": 0, "num_predict": 8}
FINAL = {"model", "created_at", "done", "done_reason", "total_duration", "load_duration",
         "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration"}
DURATIONS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")


@pytest.fixture(scope="module", params=list(BACKENDS))
def api(request: pytest.FixtureRequest, data_dir: Path, model_path: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from each_backend(request, data_dir, model_path, tmp_path_factory)


@pytest.fixture(scope="module")
def gguf(model_path: Path) -> GGUFInfo:
    return read_gguf_info(model_path)


def openai_chat(api: Served, messages: list[dict[str, str]]) -> dict[str, Any]:
    r = api.http.post("/v1/chat/completions", json={
        "model": "default", "messages": messages, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return dict(r.json())


def when(text: str) -> dt.datetime:
    stamp = dt.datetime.fromisoformat(text)
    assert stamp.tzinfo is not None, text
    return stamp


# --- the official client -------------------------------------------------------------------


def test_list_names_every_model_and_alias(api: Served, model_path: Path, gguf: GGUFInfo) -> None:
    listing = api.client.list()
    names = [m.model for m in listing.models]
    assert model_path.stem in names and "default" in names
    cards = {c["id"]: c for c in api.http.get("/v1/models").json()["data"]}
    card = cards[model_path.stem]
    assert set(names) == {card["id"], *card["meta"]["aliases"]} - {card["meta"].get("upstream_id")}
    for m in listing.models:
        d = m.details
        assert d is not None
        assert (d.format, d.family, d.families) == ("gguf", gguf.architecture, [gguf.architecture])
        assert (d.parameter_size, d.quantization_level) == (gguf.size_label, gguf.file_type)
        assert m.size == model_path.stat().st_size
        assert m.digest == listing.models[0].digest and len(m.digest or "") == 64
        int(m.digest or "", 16)
        assert m.modified_at is not None
        assert abs(m.modified_at.timestamp() - card["created"]) < 1
    for entry in api.http.get("/api/tags").json()["models"]:
        assert set(entry) == {"name", "model", "modified_at", "size", "digest", "details"}
        assert entry["name"] == entry["model"]


def test_show_reads_the_gguf(api: Served, gguf: GGUFInfo) -> None:
    shown = api.client.show("default")
    info, arch = shown.modelinfo or {}, gguf.architecture
    assert info["general.architecture"] == arch
    assert info[f"{arch}.context_length"] == gguf.context_length
    assert info[f"{arch}.embedding_length"] == gguf.embedding_length
    assert info[f"{arch}.block_count"] == gguf.block_count
    assert info["general.parameter_count"] == gguf.parameter_count
    assert set(shown.capabilities or []) == {"completion", "embedding"}  # no FIM tokens
    assert isinstance(shown.template, str) and isinstance(shown.parameters, str)
    assert shown.details is not None and shown.details.family == arch
    # Older clients send "name"; Ollama's ":latest" tag is the plain name.
    older = api.http.post("/api/show", json={"name": "default:latest"})
    assert older.status_code == 200 and older.json()["model_info"] == shown.modelinfo


def test_chat_not_streamed_matches_openai(api: Served) -> None:
    reply = api.client.chat(model="default", messages=HELLO, options=GREEDY)
    ref = openai_chat(api, HELLO)
    choice = ref["choices"][0]
    assert reply.message.role == "assistant"
    assert reply.message.content == choice["message"]["content"]
    assert reply.done and reply.done_reason == choice["finish_reason"]
    assert reply.eval_count == ref["usage"]["completion_tokens"] > 0
    assert reply.prompt_eval_count == ref["usage"]["prompt_tokens"] > 0
    for name in DURATIONS:
        assert isinstance(getattr(reply, name), int), name
    assert (reply.eval_duration or 0) > 0


def test_chat_streamed_says_the_same(api: Served) -> None:
    parts = list(api.client.chat(model="default", messages=HELLO, options=GREEDY, stream=True))
    assert len(parts) >= 2
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert parts[-1].done_reason in ("stop", "length")
    whole = api.client.chat(model="default", messages=HELLO, options=GREEDY)
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count


def test_generate_templated_and_raw(api: Served) -> None:
    system = {"role": "system", "content": "You are terse."}
    templated = api.client.generate(model="default", prompt=HELLO[0]["content"],
                                    system=system["content"], options=GREEDY)
    ref = openai_chat(api, [system, *HELLO])
    assert templated.response == ref["choices"][0]["message"]["content"]
    raw = api.client.generate(model="default", prompt="Once upon a time", raw=True,
                              options=GREEDY)
    ref = api.http.post("/v1/completions", json={
        "model": "default", "prompt": "Once upon a time", "max_tokens": 8,
        "temperature": 0}).json()
    assert raw.response == ref["choices"][0]["text"]
    assert raw.eval_count == ref["usage"]["completion_tokens"]
    streamed = api.client.generate(model="default", prompt="Once upon a time", raw=True,
                                   options=GREEDY, stream=True)
    assert "".join(p.response or "" for p in streamed) == raw.response


def test_embed_matches_v1_embeddings(api: Served, gguf: GGUFInfo) -> None:
    texts = ["The sky is blue", "Grass is green"]
    got = api.client.embed(model="default", input=texts)
    ref = api.http.post("/v1/embeddings", json={"model": "default", "input": texts}).json()
    assert len(got.embeddings) == 2
    for vec, item in zip(got.embeddings, ref["data"], strict=True):
        assert len(vec) == gguf.embedding_length
        assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(vec, item["embedding"],
                                                                   strict=True))
        assert math.isclose(math.hypot(*vec), 1.0, rel_tol=1e-3)  # unit length, as Ollama's
    assert got.prompt_eval_count == ref["usage"]["prompt_tokens"] > 0
    assert (got.total_duration or 0) > 0
    assert len(api.client.embed(model="default", input=texts[0]).embeddings) == 1
    legacy = api.client.embeddings(model="default", prompt=texts[0]).embedding
    assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(legacy, got.embeddings[0],
                                                               strict=True))


def test_ps_shows_what_is_loaded(api: Served, model_path: Path) -> None:
    api.client.chat(model="default", messages=HELLO, options=GREEDY)
    [running] = api.client.ps().models
    assert running.model == running.name == model_path.stem
    assert running.size and running.size > 0
    assert running.context_length == N_CTX
    assert running.details is not None and running.details.format == "gguf"
    [loaded] = api.http.get("/status").json()["loaded_models"]
    assert running.size_vram == (loaded.get("plan") or {}).get("gpu_bytes", 0)
    if not machine_gpu()[0]:
        assert running.size_vram == 0
    assert running.expires_at is not None
    left = running.expires_at - dt.datetime.now(dt.UTC)
    if api.mode.unloads:  # the server's keep-alive, 5 minutes
        assert dt.timedelta(minutes=4) < left <= dt.timedelta(minutes=5)
    else:  # llama-server keeps its model: never
        assert left > dt.timedelta(days=365 * 100)


def test_keep_alive_zero_unloads(api: Served) -> None:
    if not api.mode.unloads:
        with pytest.raises(ollama.ResponseError) as refused:
            api.client.generate(model="default", keep_alive=0)
        assert refused.value.status_code == 400 and "llama-server" in refused.value.error
        assert api.client.generate(model="default").done_reason == "load"
        return
    gone = api.client.generate(model="default", keep_alive=0)
    assert (gone.done, gone.done_reason, gone.response) == (True, "unload", "")
    assert api.client.ps().models == []
    assert api.http.get("/status").json()["loaded_models"] == []
    # An empty prompt loads; its keep_alive sets when the model goes.
    loaded = api.client.generate(model="default", keep_alive="10m")
    assert loaded.done_reason == "load"
    [running] = api.client.ps().models
    assert running.expires_at is not None
    left = running.expires_at - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=9) < left <= dt.timedelta(minutes=10)
    # keep_alive 0 on a real request: it answers, then the model goes.
    reply = api.client.chat(model="default", messages=HELLO, options=GREEDY, keep_alive=0)
    assert reply.message.content
    deadline = time.monotonic() + 30
    while api.client.ps().models:
        assert time.monotonic() < deadline, "keep_alive 0 never unloaded the model"
        time.sleep(0.1)
    # The next request loads it again, and says how long that took.
    again = api.client.chat(model="default", messages=HELLO, options=GREEDY)
    assert again.load_duration and again.load_duration > 0
    # Negative keeps it forever; so does a keep-alive longer than a date can say.
    for forever in (-1, "-5m", 1e300):
        assert api.client.generate(model="default", keep_alive=forever).done_reason == "load"
        [running] = api.client.ps().models
        assert running.expires_at is not None
        assert running.expires_at - dt.datetime.now(dt.UTC) > dt.timedelta(days=365 * 100)
    api.client.generate(model="default", keep_alive="5m")


@pytest.mark.parametrize("call", ["chat", "generate", "show", "embed"])
def test_unknown_model_raises_404(api: Served, call: str) -> None:
    calls = {
        "chat": lambda: api.client.chat(model="no-such-model", messages=HELLO),
        "generate": lambda: api.client.generate(model="no-such-model", prompt="hi"),
        "show": lambda: api.client.show("no-such-model"),
        "embed": lambda: api.client.embed(model="no-such-model", input="hi"),
    }
    with pytest.raises(ollama.ResponseError) as err:
        calls[call]()
    assert err.value.status_code == 404
    assert "no-such-model" in err.value.error


# --- bytes on the wire ------------------------------------------------------------------------


def check_final(last: dict[str, Any], wall_ns: int) -> None:
    assert last["done"] is True and last["done_reason"] in ("stop", "length")
    for name in (*DURATIONS, "prompt_eval_count", "eval_count"):
        assert isinstance(last[name], int) and last[name] >= 0, (name, last)
    # Nanoseconds: a generation takes more than a millisecond, and no longer than we waited.
    assert 1_000_000 < last["total_duration"] <= wall_ns
    for name in ("load_duration", "prompt_eval_duration", "eval_duration"):
        assert last[name] <= last["total_duration"], name
    assert last["eval_count"] > 0 and last["eval_duration"] > 0


@pytest.mark.parametrize(("path", "field"), [("/api/chat", "message"),
                                             ("/api/generate", "response")])
def test_stream_is_newline_delimited_json(api: Served, path: str, field: str) -> None:
    body: dict[str, Any] = {"model": "default", "options": GREEDY}  # no "stream": it streams
    body.update({"messages": HELLO} if field == "message" else {"prompt": "Once upon a time"})
    t0 = time.monotonic_ns()
    r = api.http.post(path, json=body)
    wall = time.monotonic_ns() - t0
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    lines = ndjson(r)
    assert len(lines) >= 2
    stamps = [when(line["created_at"]) for line in lines]
    assert stamps == sorted(stamps)
    for line in lines[:-1]:
        assert set(line) == {"model", "created_at", field, "done"}, line
        assert line["model"] == "default" and line["done"] is False
        piece = line[field]["content"] if field == "message" else line[field]
        assert isinstance(piece, str) and piece
        if field == "message":
            assert line[field] == {"role": "assistant", "content": piece}
    last = lines[-1]
    assert set(last) == FINAL | {field}, last
    assert last[field] == ({"role": "assistant", "content": ""} if field == "message" else "")
    check_final(last, wall)
    assert last["eval_count"] >= len(lines) - 1  # a line carries one token or more


def test_stream_false_is_one_object(api: Served) -> None:
    t0 = time.monotonic_ns()
    r = api.http.post("/api/chat", json={"model": "default", "messages": HELLO,
                                         "options": GREEDY, "stream": False})
    wall = time.monotonic_ns() - t0
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert "\n" not in r.text
    body = r.json()
    assert set(body) == FINAL | {"message"}
    assert body["message"]["role"] == "assistant" and body["message"]["content"]
    check_final(body, wall)


def test_any_content_type_is_read_as_json(api: Served) -> None:
    """``curl -d``, as in Ollama's docs, sends application/x-www-form-urlencoded."""
    r = api.http.post("/api/generate", content=json.dumps({
        "model": "default", "prompt": "Once upon a time", "stream": False, "options": GREEDY}),
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    assert r.json()["response"]


def test_empty_messages_and_prompt_load(api: Served) -> None:
    r = api.http.post("/api/chat", json={"model": "default", "messages": []})
    [line] = ndjson(r)
    assert line["done"] is True and line["done_reason"] == "load"
    assert line["message"] == {"role": "assistant", "content": ""}
    r = api.http.post("/api/generate", json={"model": "default", "stream": False})
    assert r.headers["content-type"] == "application/json"
    assert r.json()["done_reason"] == "load" and r.json()["response"] == ""
    r = api.http.post("/api/embed", json={"model": "default", "input": []})
    assert r.json() == {"model": "default", "embeddings": []}


def test_format_json(api: Served) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    for fmt in ("json", schema):
        r = api.http.post("/api/chat", json={
            "model": "default", "messages": [{"role": "user", "content": "Reply in JSON"}],
            "format": fmt, "stream": False, "options": {"temperature": 0, "num_predict": 48}})
        if not api.mode.json_format:
            assert r.status_code == 400 and "JSON" in r.json()["error"], r.text
            continue
        assert r.status_code == 200, r.text
        content = r.json()["message"]["content"]
        assert content.lstrip().startswith("{"), content
        if r.json()["done_reason"] == "stop":
            parsed = json.loads(content)
            assert isinstance(parsed, dict)
            if fmt is schema:
                assert isinstance(parsed["n"], int)


TOOL = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}
BAD_REQUESTS = [
    ("POST", "/api/chat", b"{bad", 400, "not valid JSON"),
    ("POST", "/api/chat", {"messages": HELLO}, 400, "model"),
    ("POST", "/api/chat", {"model": "no-such-model", "messages": HELLO}, 404, "no-such-model"),
    ("POST", "/api/chat", {"model": "../../etc/passwd", "messages": HELLO}, 404, "passwd"),
    ("POST", "/api/chat", {"model": "default", "messages": [{"role": "bot", "content": "x"}]},
     400, "role"),
    ("POST", "/api/chat", {"model": "default", "messages": HELLO,
                           "options": {"temperature": "hot"}}, 400, "options.temperature"),
    ("POST", "/api/chat", {"model": "default", "messages": HELLO,
                           "options": {"num_ctx": N_CTX * 50}}, 400, str(N_CTX)),
    ("POST", "/api/chat", {"model": "default", "messages": HELLO, "think": True}, 400, "think"),
    ("POST", "/api/chat", {"model": "default", "messages": HELLO, "tools": [TOOL]}, 400,
     "tools"),
    ("POST", "/api/chat", {"model": "default", "messages": [
        {"role": "user", "content": "what is this?", "images": ["aGk="]}]}, 400, "Images"),
    ("POST", "/api/chat", {"model": "default", "messages": HELLO, "keep_alive": "forever"},
     400, "keep_alive"),
    ("POST", "/api/generate", {"model": "default", "prompt": "def f(", "suffix": "  return"},
     400, "fill in the middle"),
    ("POST", "/api/generate", {"model": "default", "prompt": "x", "context": [1, 2]}, 400,
     "context"),
    ("POST", "/api/generate", {"model": "default", "prompt": "x", "template": "{{.Prompt}}"},
     400, "template"),
    ("POST", "/api/embed", {"model": "default", "input": ["ok", ""]}, 400, "input"),
    ("POST", "/api/embed", {"model": "default", "input": "hi", "dimensions": 3}, 400,
     "dimensions"),
    ("POST", "/api/show", {}, 400, "model"),
    ("GET", "/api/chat", None, 405, "not allowed"),
    ("POST", "/api/pull", {"model": "llama3.2"}, 400, "does not download"),
    ("POST", "/api/push", {"model": "me/x"}, 400, "does not upload"),
    ("POST", "/api/create", {"model": "x", "from": "default"}, 400, "Modelfile"),
    ("POST", "/api/copy", {"source": "default", "destination": "x"}, 400, "copy"),
    ("DELETE", "/api/delete", {"model": "default"}, 400, "delete"),
    ("POST", "/api/blobs/sha256:00", b"weights", 400, "blob"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "says"), BAD_REQUESTS)
def test_errors_are_ollama_shaped(api: Served, method: str, path: str, body: Any,
                                  status: int, says: str) -> None:
    content = body if isinstance(body, bytes) or body is None else json.dumps(body)
    r = api.http.request(method, path, content=content)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()
    assert set(error) == {"error"} and isinstance(error["error"], str), error
    assert says in error["error"] and "Traceback" not in error["error"]
    assert api.http.get("/health").status_code == 200  # and it keeps serving


def test_our_own_api_paths_keep_the_openai_shape(api: Served) -> None:
    assert_openai_error(api.http.post("/api/models/no-such-model/load"),
                        404 if api.mode.unloads else 400)
    assert_openai_error(api.http.post("/v1/chat/completions", json={"messages": "x"}), 400)


def test_one_listener_unless_asked(api: Served) -> None:
    ports = {c.laddr.port for c in psutil.Process(api.proc.proc.pid).net_connections("inet")
             if c.status == psutil.CONN_LISTEN}
    assert ports == {api.proc.port}


# --- faults and the second listener (not per backend) -----------------------------------------


def test_ollama_port_setting(tmp_path: Path) -> None:
    assert load_settings([], environ={}).ollama_port == 0  # off unless asked
    assert load_settings(["--ollama-port", "11434"], environ={}).ollama_port == 11434
    assert load_settings([], environ={"ML_OFFLOAD_OLLAMA_PORT": "11434"}).ollama_port == 11434
    toml = tmp_path / "ml-offload.toml"
    toml.write_text("ollama_port = 11434\n")
    assert load_settings(["--config", str(toml)], environ={}).ollama_port == 11434
    for bad in ("9000", "70000", "-1", "eleven"):
        with pytest.raises(ConfigError, match=r"ollama_port|integer"):
            load_settings(["--port", "9000", "--ollama-port", bad], environ={})


def test_upstream_lost_mid_stream_ends_with_an_error_line(data_dir: Path, model_path: Path,
                                                          tmp_path: Path) -> None:
    with LlamaServer(model_path, tmp_path, free_port(), LLAMA_SERVER_ARGS) as upstream, \
            ServerProcess(data_dir, env=proxy_env(upstream.url)) as proc:
        upstream.start().wait_ready()
        proc.wait_ready()
        body = {"model": "default", "prompt": "Once upon a time", "raw": True,
                "options": {"num_predict": 1500, "temperature": 1}}
        with httpx.stream("POST", proc.url + "/api/generate", json=body, timeout=120) as r:
            lines = r.iter_lines()
            first = json.loads(next(lines))
            assert first["done"] is False
            upstream.kill()
            rest = [json.loads(line) for line in lines]
        assert rest and set(rest[-1]) == {"error"} and "llama-server" in rest[-1]["error"]
        assert all(not line.get("done") for line in rest)


def test_ollama_port_serves_the_same_api_behind_the_key(data_dir: Path) -> None:
    second = free_port()
    env = {"ML_OFFLOAD_N_CTX": str(N_CTX), "ML_OFFLOAD_OLLAMA_PORT": str(second),
           "ML_OFFLOAD_API_KEY": "sekret"}
    with ServerProcess(data_dir, env=env) as proc:
        proc.wait_ready()
        other = f"http://127.0.0.1:{second}"
        refused = httpx.get(other + "/api/tags")
        assert refused.status_code == 401 and set(refused.json()) == {"error"}
        assert isinstance(refused.json()["error"], str)
        assert_openai_error(httpx.get(other + "/api/backend/info"), 401)
        key = {"Authorization": "Bearer sekret"}
        tags = httpx.get(other + "/api/tags", headers=key).json()
        assert tags == httpx.get(proc.url + "/api/tags", headers=key).json()
        assert httpx.get(other + "/v1/models", headers=key).json()["object"] == "list"
        client = ollama.Client(host=other, headers=key, timeout=120)
        assert client.chat(model="default", messages=HELLO, options=GREEDY).message.content
        ports = {c.laddr.port for c in psutil.Process(proc.proc.pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN}
        assert ports == {proc.port, second}
