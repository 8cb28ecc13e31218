"""Managed mode against real llama-server children on the embedded model: parallel slots,
crash isolation, engines that never get ready, unload and shutdown leaving nothing behind,
swapping, and the queue's `: queued N` comments."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from helpers import REPO, ServerProcess, assert_openai_error, model_folder, sse_events, wait_for
from llama_server import llama_server_bin

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Path:
    """Two ids for the real weights, one llama.cpp cannot load (an architecture it does not
    know; the header still reads), and two that the wrapper below fails and hangs on."""
    folder = tmp_path_factory.mktemp("engine-models")
    return model_folder(folder, model_path, ["second", "hangs", "exits"])


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama-server itself, except for two models: it exits at once for `exits.gguf` and
    hangs at start for `hangs.gguf` (what a broken build or a stuck GPU driver does)."""
    path = tmp_path_factory.mktemp("bin") / "llama-server"
    path.write_text(f"""#!/bin/sh
case "$*" in
  *exits.gguf*) echo "fatal: cannot initialise the backend" >&2; exit 3 ;;
  *hangs.gguf*) exec sleep 600 ;;
esac
exec {llama_server_bin()} "$@"
""")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def start(data_dir: Path, models_dir: Path, binary: Path, **env: str) -> ServerProcess:
    base = {"ML_OFFLOAD_BACKEND": "managed", "ML_OFFLOAD_LLAMA_SERVER_BIN": str(binary),
            "ML_OFFLOAD_MODELS_DIR": str(models_dir), "ML_OFFLOAD_N_CTX": "1024"}
    return ServerProcess(data_dir, env={**base, **env}).wait_ready()


@pytest.fixture(scope="module")
def managed(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, models_dir: Path,
            wrapper: Path) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("managed-data")
    (data / "models").mkdir()
    os.link(data_dir / "models" / "gemma-3-270m-q4_k_m.gguf",
            data / "models" / "gemma-3-270m-q4_k_m.gguf")
    proc = start(data, models_dir, wrapper, ML_OFFLOAD_LOAD_TIMEOUT="15s",
                 ML_OFFLOAD_MAX_LOADED="2")
    try:
        yield proc
    finally:
        proc.stop()


def status(url: str) -> dict[str, Any]:
    return dict(httpx.get(url + "/status", timeout=30).json())


def engine(url: str, model: str = "gemma-3-270m-q4_k_m") -> dict[str, Any]:
    for m in status(url)["loaded_models"]:
        if m["id"] == model:
            return dict(m["engine"])
    raise AssertionError(f"{model} is not loaded: {status(url)['loaded_models']}")


def chat(url: str, model: str = "default", max_tokens: int = 4, **extra: Any) -> httpx.Response:
    return httpx.post(url + CHAT, timeout=180, json={
        "model": model, "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": max_tokens, **extra})



def busy_slots(url: str, model: str = "gemma-3-270m-q4_k_m") -> int:
    return sum(m["slots"]["busy"] for m in status(url)["loaded_models"] if m["id"] == model)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def children(proc: ServerProcess) -> list[psutil.Process]:
    return [c for c in psutil.Process(proc.proc.pid).children(recursive=True)
            if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


# --- the engine serves ------------------------------------------------------------------


def test_the_default_model_runs_in_its_own_process(managed: ServerProcess) -> None:
    url = managed.url
    assert chat(url).status_code == 200
    info = httpx.get(url + "/api/backend/info", timeout=30).json()
    assert info["backend"] == "managed" and "llama-server" in info["mode"]["why"]
    e = engine(url)
    assert e["kind"] == "llama-server" and e["alive"] is True
    assert e["pid"] != managed.proc.pid and psutil.pid_exists(e["pid"])
    assert e["pid"] in [c.pid for c in psutil.Process(managed.proc.pid).children(recursive=True)]
    assert e["rss_bytes"] > 50 * 1024**2 and e["uptime_seconds"] >= 0
    model = next(m for m in status(url)["loaded_models"] if m["id"] == "gemma-3-270m-q4_k_m")
    assert model["slots"]["total"] == 4 and model["plan"]["n_slots"] == 4
    # Every slot gets the whole context: llama-server was started with -c n_ctx × slots.
    cmdline = psutil.Process(e["pid"]).cmdline()
    assert cmdline[cmdline.index("-c") + 1] == str(1024 * 4)
    assert cmdline[cmdline.index("--parallel") + 1] == "4"
    assert "--embeddings" in cmdline and "mean" in cmdline
    # Its key reached it through the environment, never the command line.
    env = psutil.Process(e["pid"]).environ()
    assert env.get("LLAMA_API_KEY") and env["LLAMA_API_KEY"] not in " ".join(cmdline)
    # And the port answers nobody without that key.
    denied = httpx.post(f"http://127.0.0.1:{e['port']}/v1/chat/completions",
                        json={"messages": [{"role": "user", "content": "x"}]}, timeout=30)
    assert denied.status_code == 401


def test_a_request_may_use_the_whole_context_or_is_refused(managed: ServerProcess) -> None:
    url = managed.url
    # ~1000 prompt tokens fit the 1024 promised to every request, with slots to spare.
    ok = httpx.post(url + "/v1/completions", timeout=180, json={
        "prompt": "word " * 900, "max_tokens": 8})
    assert ok.status_code == 200, ok.text
    too_long = httpx.post(url + "/v1/completions", timeout=180, json={
        "prompt": "word " * 1500, "max_tokens": 8})
    assert_openai_error(too_long, 400, code="context_length_exceeded")


def test_access_log_has_token_counts(managed: ServerProcess) -> None:
    r = chat(managed.url, max_tokens=3, temperature=0)
    usage = r.json()["usage"]
    line = (f"model=default prompt_tokens={usage['prompt_tokens']} "
            f"completion_tokens={usage['completion_tokens']}")
    assert line in managed.wait_log(line)


def stream_times(url: str, n_tokens: int, out: dict[int, list[float]], i: int,
                 prompt: str = "Once upon a time") -> None:
    body = {"prompt": prompt, "max_tokens": n_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        for ev in sse_events(r):
            if isinstance(ev, dict) and ev.get("choices") and ev["choices"][0].get("text"):
                out[i].append(time.monotonic())


def test_four_concurrent_streams_decode_together(managed: ServerProcess) -> None:
    url = managed.url
    chat(url)  # loaded
    times: dict[int, list[float]] = {i: [] for i in range(4)}
    threads = [threading.Thread(target=stream_times, args=(url, 48, times, i))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(len(times[i]) >= 40 for i in times), {i: len(v) for i, v in times.items()}
    first_ends = min(v[-1] for v in times.values())
    # Every stream had started before any of them finished: none waited for another.
    assert all(v[0] < first_ends for v in times.values())
    # And their tokens interleave in time.
    spans = [(v[0], v[-1]) for v in times.values()]
    overlap = min(e for _, e in spans) - max(s for s, _ in spans)
    assert overlap > 0


# --- crash isolation ----------------------------------------------------------------------


def test_sigsegv_mid_stream_costs_only_that_request(managed: ServerProcess) -> None:
    url = managed.url
    chat(url)
    before = engine(url)["pid"]
    events: list[Any] = []
    body = {"prompt": "Once upon a time", "max_tokens": 400, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for ev in sse_events(r):
            events.append(ev)
            if len(events) == 3:
                os.kill(before, signal.SIGSEGV)
    assert events[-1] == "[DONE]"
    err = events[-2]["error"]
    assert err["code"] == "engine_crashed" and "SIGSEGV" in err["message"]
    assert "gemma-3-270m-q4_k_m" in err["message"]
    # The server itself never restarted; the next request starts a new engine.
    assert managed.proc.poll() is None
    assert chat(url).status_code == 200
    after = engine(url)["pid"]
    assert after != before and not psutil.pid_exists(before)
    counts = status(url)["engines"]["gemma-3-270m-q4_k_m"]
    assert counts["crashes"] >= 1 and counts["restarts"] >= 1
    metrics = httpx.get(url + "/metrics", timeout=30).text
    assert 'mloffload_engine_crashes_total{model="gemma-3-270m-q4_k_m"}' in metrics
    assert 'mloffload_engine_restarts_total{model="gemma-3-270m-q4_k_m"}' in metrics


def test_sigkill_during_a_plain_request_and_while_idle(managed: ServerProcess) -> None:
    url = managed.url
    chat(url)
    pid = engine(url)["pid"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        long = pool.submit(httpx.post, url + "/v1/completions", timeout=120,
                           json={"prompt": "Once upon a time", "max_tokens": 400})
        wait_for(lambda: busy_slots(url) >= 1, what="the request runs")
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        r = long.result()
    err = assert_openai_error(r, 502, code="engine_crashed")
    assert "SIGKILL" in err["message"]
    assert chat(url).status_code == 200
    idle = engine(url)["pid"]
    assert idle != pid
    os.kill(idle, signal.SIGKILL)  # while idle: noticed at once, the next request is served
    wait_for(lambda: all(m["id"] != "gemma-3-270m-q4_k_m" or m["engine"]["pid"] != idle
                         for m in status(url)["loaded_models"]), what="the dead engine gone")
    assert chat(url).status_code == 200
    assert status(url)["requests"]["active"] == 0


# --- engines that never get ready --------------------------------------------------------


def test_engines_that_never_get_ready(managed: ServerProcess) -> None:
    url = managed.url
    exits = chat(url, "exits")
    err = assert_openai_error(exits, 503, code="model_load_failed")
    assert "exit status 3" in err["message"] and "cannot initialise the backend" in err["message"]
    alien = chat(url, "alien")
    err = assert_openai_error(alien, 503, code="model_load_failed")
    assert "exited before it was ready" in err["message"] and "gemmaX" in err["message"]
    hangs = chat(url, "hangs")  # load_timeout is 15s for this server
    err = assert_openai_error(hangs, 503)
    assert err["code"] in ("model_load_failed", "model_loading")
    # None of them left a process behind, and the default model still answers.
    wait_for(lambda: all("sleep" not in " ".join(c.cmdline()) for c in children(managed)),
             timeout=30, what="the hanging engine killed")
    assert chat(url).status_code == 200


def test_a_crash_loop_marks_the_model_unusable_until_loaded_explicitly(
        managed: ServerProcess) -> None:
    url = managed.url
    for _ in range(3):
        chat(url, "exits")
    gone = chat(url, "exits")
    err = assert_openai_error(gone, 500, code="model_unusable")
    assert "failed to start 3 times in a row" in err["message"]
    card = httpx.get(url + "/v1/models/exits", timeout=30).json()
    assert card["meta"]["usable"] is False
    again = httpx.post(url + "/api/models/exits/load", timeout=60)
    assert_openai_error(again, 503, code="model_load_failed")  # tried again, really
    assert httpx.get(url + "/v1/models/exits", timeout=30).json()["meta"]["usable"] is True


# --- unload, swap, queue -------------------------------------------------------------------


def test_unload_ends_the_process_and_frees_port_and_memory(managed: ServerProcess) -> None:
    url = managed.url
    httpx.post(url + "/api/models/default/unload", timeout=60)
    wait_for(lambda: not any(m["id"] == "gemma-3-270m-q4_k_m"
                             for m in status(url)["loaded_models"]), what="unloaded")
    base = sum(c.memory_info().rss for c in children(managed))
    assert chat(url).status_code == 200
    e = engine(url)
    loaded = sum(c.memory_info().rss for c in children(managed))
    assert loaded - base > 100 * 1024**2
    r = httpx.post(url + "/api/models/default/unload", timeout=60).json()
    assert r["unloaded"] is True
    assert not psutil.pid_exists(e["pid"])  # exited and reaped: no zombie either
    assert not port_open(e["port"])
    after = sum(c.memory_info().rss for c in children(managed))
    assert after - base < 20 * 1024**2


def test_swapping_two_models_with_max_loaded_one(tmp_path: Path, data_dir: Path,
                                                  models_dir: Path, wrapper: Path) -> None:
    (tmp_path / "models").mkdir()
    os.link(data_dir / "models" / "gemma-3-270m-q4_k_m.gguf",
            tmp_path / "models" / "gemma-3-270m-q4_k_m.gguf")
    with start(tmp_path, models_dir, wrapper, ML_OFFLOAD_MAX_LOADED="1") as proc:
        url = proc.url
        assert chat(url, "second").status_code == 200
        first = engine(url, "second")["pid"]
        assert [m["id"] for m in status(url)["loaded_models"]] == ["second"]
        assert chat(url, "default").status_code == 200
        assert [m["id"] for m in status(url)["loaded_models"]] == ["gemma-3-270m-q4_k_m"]
        assert not psutil.pid_exists(first)
        assert len(children(proc)) == 1


def test_a_queued_stream_says_where_it_stands(tmp_path: Path, data_dir: Path,
                                              models_dir: Path, wrapper: Path) -> None:
    (tmp_path / "models").mkdir()
    os.link(data_dir / "models" / "gemma-3-270m-q4_k_m.gguf",
            tmp_path / "models" / "gemma-3-270m-q4_k_m.gguf")
    with start(tmp_path, models_dir, wrapper, ML_OFFLOAD_PARALLEL="1",
               ML_OFFLOAD_REQUEST_TIMEOUT="3s") as proc:
        url = proc.url
        chat(url)
        times: dict[int, list[float]] = {0: []}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            busy = pool.submit(stream_times, url, 160, times, 0, "Once")
            wait_for(lambda: busy_slots(url) >= 1, what="busy")
            lines: list[str] = []
            with httpx.stream("POST", url + "/v1/completions", timeout=120, json={
                    "prompt": "Twice", "max_tokens": 4, "stream": True}) as r:
                assert r.status_code == 200
                lines = [ln for ln in r.iter_lines() if ln]
            busy.result()
        assert len(times[0]) > 100  # the stream in front was served whole
    queued = [ln for ln in lines if ln.startswith(": queued")]
    assert queued and queued[0] == ": queued 0"
    # It waited longer than the request timeout without timing out: waiting is not work.
    assert len(queued) >= 2
    data = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: {")]
    assert data and all("error" not in d for d in data)
    assert lines[-1] == "data: [DONE]"


# --- shutdown ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_server_shutdown_leaves_no_engine(how: str, tmp_path: Path, data_dir: Path,
                                          models_dir: Path, wrapper: Path) -> None:
    (tmp_path / "models").mkdir()
    os.link(data_dir / "models" / "gemma-3-270m-q4_k_m.gguf",
            tmp_path / "models" / "gemma-3-270m-q4_k_m.gguf")
    proc = start(tmp_path, models_dir, wrapper)
    try:
        assert chat(proc.url).status_code == 200
        assert chat(proc.url, "second").status_code == 200
        pids = [c.pid for c in children(proc)]
        assert len(pids) >= 1
        proc.proc.send_signal(getattr(signal, how))
        proc.proc.wait(30)
        wait_for(lambda: not any(psutil.pid_exists(p) and
                                 psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                 for p in pids), timeout=30, what="no orphan engines")
    finally:
        proc.stop()


def test_managed_mode_needs_a_binary(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ML_OFFLOAD_")}
    env.update({"ML_OFFLOAD_BACKEND": "managed", "ML_OFFLOAD_DATA_DIR": str(tmp_path),
                "ML_OFFLOAD_LLAMA_SERVER_BIN": str(tmp_path / "missing"),
                "PATH": "/usr/bin:/bin"})
    out = subprocess.run([sys.executable, "-m", "mloffload.server"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "not an executable file" in out.stderr and "Traceback" not in out.stderr
