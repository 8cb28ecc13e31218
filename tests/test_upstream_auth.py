"""A llama-server started with ``--api-key``: our server sends the key it was given
(``ML_OFFLOAD_LLAMACPP_API_KEY`` or ``llamacpp_api_key_file``), says clearly when the key is
missing or wrong, never logs it, and hands it to a llama-server it starts itself through the
environment rather than the process list.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from helpers import ServerProcess, assert_openai_error, free_port, sse_events
from llama_server import LlamaServer, llama_server_bin, proxy_env, running

KEY = "upstream-secret-4f1c9e"
CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def keyed_upstream(model_path: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    with running(model_path, tmp_path_factory.mktemp("llama-server-keyed"), free_port(),
                 ["--api-key", KEY, "--chat-template", "gemma", "--no-jinja"]) as server:
        yield server


def test_llama_server_really_requires_the_key(keyed_upstream: LlamaServer) -> None:
    """The premise: without the key llama-server refuses; /health stays open."""
    assert httpx.get(keyed_upstream.url + "/v1/models").status_code == 401
    assert httpx.get(keyed_upstream.url + "/health").status_code == 200


def test_the_key_from_the_environment_is_sent(data_dir: Path,
                                              keyed_upstream: LlamaServer) -> None:
    env = {**proxy_env(keyed_upstream.url), "ML_OFFLOAD_LLAMACPP_API_KEY": KEY}
    with ServerProcess(data_dir, env=env) as proc:
        proc.wait_ready()
        # The client needs no key for our server (it has none); ours goes upstream.
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()]
        answer = client.chat.completions.create(
            model="default", messages=HELLO, max_tokens=4)  # type: ignore[arg-type]
        assert answer.choices[0].message.content
        with httpx.stream("POST", proc.url + CHAT, timeout=120,
                          json={"messages": HELLO, "max_tokens": 4, "stream": True}) as r:
            assert r.status_code == 200
            events = list(sse_events(r))
        assert events[-1] == "[DONE]"
        assert "".join(e["choices"][0]["delta"].get("content") or ""
                       for e in events[:-1] if e.get("choices"))
        proc.wait_log(f"POST {CHAT} 200")
        assert KEY not in proc.log()


def test_a_missing_or_wrong_key_is_a_clear_502(data_dir: Path, keyed_upstream: LlamaServer,
                                               tmp_path: Path) -> None:
    wrong = tmp_path / "llamacpp.key"
    wrong.write_text("not-the-key\n")
    cases = [(proxy_env(keyed_upstream.url), "no API key was sent"),
             ({**proxy_env(keyed_upstream.url),
               "ML_OFFLOAD_LLAMACPP_API_KEY_FILE": str(wrong)}, "refused the key")]
    for env, said in cases:
        with ServerProcess(data_dir, env=env) as proc:
            proc.wait_ready(path="/")
            assert "ML_OFFLOAD_LLAMACPP_API_KEY" in proc.wait_log("requires an API key")
            # llama-server's /health is open, but a server that can't use it is not ready.
            health = httpx.get(proc.url + "/api/health").json()
            entry = health["backends"]["llamacpp"]
            assert entry["available"] is True and entry["ready"] is False
            assert "ML_OFFLOAD_LLAMACPP_API_KEY" in entry["details"]
            r = httpx.get(proc.url + "/health")
            assert r.status_code == 503 and "API key" in r.text
            r = httpx.post(proc.url + CHAT, json={"messages": HELLO, "max_tokens": 2},
                           timeout=60)
            # Not the client's fault: not a 401 that would send it looking at its own key.
            err = assert_openai_error(r, 502)
            assert err["code"] == "upstream_auth_failed"
            assert said in err["message"] and "ML_OFFLOAD_LLAMACPP_API_KEY" in err["message"]
            assert "not-the-key" not in proc.log()


def test_supervised_llama_server_gets_the_key_outside_its_command_line(
        data_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    key_file = tmp_path / "llamacpp.key"
    key_file.write_text(KEY)
    env = {**proxy_env(f"http://127.0.0.1:{port}"), "ML_OFFLOAD_N_CTX": "2048",
           "ML_OFFLOAD_LLAMACPP_API_KEY_FILE": str(key_file)}
    with ServerProcess(data_dir, args=["--llama-server-bin", str(llama_server_bin())],
                       env=env) as proc, httpx.Client(base_url=proc.url, timeout=120) as api:
        proc.wait_ready(timeout=240)
        r = api.post(CHAT, json={"messages": HELLO, "max_tokens": 2})
        assert r.status_code == 200, r.text
        sup = api.get("/api/backend/info").json()["supervisor"]
        assert KEY not in " ".join(psutil.Process(sup["pid"]).cmdline())
        assert KEY not in api.get("/api/backend/info").text
        # The supervised llama-server enforces it: straight to it without the key is a 401.
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        assert KEY not in proc.log()


def test_readiness_comes_back_once_the_key_is_no_longer_refused(
        data_dir: Path, model_path: Path, tmp_path: Path) -> None:
    port = free_port()
    keyed = LlamaServer(model_path, tmp_path, port, ["--api-key", KEY])
    with ServerProcess(data_dir, env=proxy_env(keyed.url)) as proc:
        with keyed:
            keyed.start().wait_ready()
            proc.wait_ready(path="/")
            # Our server started while llama-server was still loading; once that is up, the
            # first health probe finds our (missing) key refused.
            deadline = time.monotonic() + 60
            while "API key" not in (r := httpx.get(proc.url + "/health")).text:
                assert time.monotonic() < deadline, proc.log()
                time.sleep(0.2)
            assert r.status_code == 503 and "requires an API key" in proc.log()
        # llama-server comes back without --api-key: the same server becomes ready again.
        with LlamaServer(model_path, tmp_path, port) as open_server:
            open_server.start().wait_ready()
            proc.wait_ready(timeout=60)
            r = httpx.post(proc.url + CHAT, json={"messages": HELLO, "max_tokens": 2},
                           timeout=60)
            assert r.status_code == 200, r.text
