"""Model lifecycle with the real model: on-demand load, keep-alive, swap, single-flight,
memory given back, and the GPU endpoints' no-GPU answers."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import ServerProcess, assert_openai_error, machine_gpu, model_folder, wait_for

MiB = 1024**2


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Path:
    """Two more ids for the same weights (hard links), and one GGUF llama.cpp cannot load."""
    folder = tmp_path_factory.mktemp("models")
    return model_folder(folder, model_path, ["second", "third"])


def start(data_dir: Path, models_dir: Path, **env: str) -> ServerProcess:
    base = {"ML_OFFLOAD_MODELS_DIR": str(models_dir), "ML_OFFLOAD_N_CTX": "1024"}
    return ServerProcess(data_dir, env={**base, **env}).wait_ready()


def status(url: str) -> dict[str, Any]:
    return dict(httpx.get(url + "/status", timeout=30).json())


def loaded_ids(url: str) -> list[str]:
    return [m["id"] for m in status(url)["loaded_models"]]


def chat(url: str, model: str, **extra: Any) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
        **extra})



def metric(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or sample.labels == labels):
                return float(sample.value)
    raise KeyError(name)


@pytest.fixture(scope="module")
def lifecycle_server(data_dir: Path, models_dir: Path) -> Iterator[ServerProcess]:
    proc = start(data_dir, models_dir, ML_OFFLOAD_MAX_LOADED="1")
    try:
        yield proc
    finally:
        proc.stop()


def test_default_preloaded_others_on_demand(lifecycle_server: ServerProcess) -> None:
    url = lifecycle_server.url
    wait_for(lambda: loaded_ids(url) == ["gemma-3-270m-q4_k_m"])
    assert chat(url, "second").status_code == 200
    assert loaded_ids(url) == ["second"]  # max_loaded 1: the idle default was swapped out
    model = status(url)["loaded_models"][0]
    offload, _ = machine_gpu()  # 270M fits any GPU whole; without one, nothing goes there
    assert model["n_gpu_layers"] == (19 if offload else 0) and model["plan"]["max_layers"] == 19
    assert model["keep_alive_left_seconds"] > 0


def test_swap_between_models(lifecycle_server: ServerProcess) -> None:
    url = lifecycle_server.url
    assert chat(url, "third").status_code == 200
    assert loaded_ids(url) == ["third"]
    assert chat(url, "default").status_code == 200
    assert loaded_ids(url) == ["gemma-3-270m-q4_k_m"]


def test_concurrent_first_requests_cause_one_load(lifecycle_server: ServerProcess) -> None:
    url = lifecycle_server.url
    assert chat(url, "default").status_code == 200  # "second" is not loaded now
    loads = metric(url, "mloffload_model_load_seconds_count")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: chat(url, "second"), range(3)))
    assert [r.status_code for r in results] == [200, 200, 200]
    assert metric(url, "mloffload_model_load_seconds_count") == loads + 1


def test_keep_alive_zero_unloads_and_gives_memory_back(lifecycle_server: ServerProcess) -> None:
    url = lifecycle_server.url
    assert chat(url, "third").status_code == 200
    loaded_rss = lifecycle_server.rss()
    assert chat(url, "third", keep_alive=0).status_code == 200
    wait_for(lambda: loaded_ids(url) == [])
    assert status(url)["loaded_models"] == []
    # The weights (~235 MiB mapped and touched) and the KV cache are gone from the process.
    wait_for(lambda: lifecycle_server.rss() < loaded_rss - 150 * MiB, timeout=20)


def test_admin_load_and_unload(lifecycle_server: ServerProcess) -> None:
    url = lifecycle_server.url
    r = httpx.post(url + "/api/models/second/load", timeout=120)
    assert r.status_code == 200 and r.json()["id"] == "second"
    assert loaded_ids(url) == ["second"]
    r = httpx.post(url + "/api/models/second/unload", timeout=60)
    assert r.json() == {"unloaded": True, "id": "second"}
    assert loaded_ids(url) == []
    assert httpx.post(url + "/api/models/second/unload", timeout=60).json()["unloaded"] is False
    assert_openai_error(httpx.post(url + "/api/models/nope/load", timeout=60), 404,
                        code="model_not_found")


def test_model_llama_cpp_cannot_load(lifecycle_server: ServerProcess) -> None:
    url = lifecycle_server.url
    err = assert_openai_error(chat(url, "alien"), 503, code="model_load_failed")
    assert "alien" in err["message"]
    assert chat(url, "default").status_code == 200  # and the server goes on


def test_ttl_unload(data_dir: Path, models_dir: Path) -> None:
    with start(data_dir, models_dir, ML_OFFLOAD_KEEP_ALIVE="1s") as proc:
        assert chat(proc.url, "second").status_code == 200
        wait_for(lambda: loaded_ids(proc.url) == [], timeout=30)
        # Per-request keep_alive overrides the default: -1 keeps it loaded.
        assert chat(proc.url, "second", keep_alive=-1).status_code == 200
        time.sleep(2.5)
        assert loaded_ids(proc.url) == ["second"]


def test_gpu_endpoints_match_the_machine(lifecycle_server: ServerProcess) -> None:
    url = lifecycle_server.url
    vram = httpx.get(url + "/vram").json()
    st = status(url)
    offload, _ = machine_gpu()
    if vram["available"]:  # the GPU's real numbers
        assert vram["gpus"] and vram["total_gb"] > 0
        assert vram["used_bytes"] + vram["free_bytes"] <= vram["total_bytes"] * 1.01
        assert st["gpu"]["available"] is True
        assert [g["name"] for g in st["gpu"]["gpus"]] == [g["name"] for g in vram["gpus"]]
        assert metric(url, "mloffload_gpu_available") == 1.0
    else:  # none, and the reason
        assert "NVML" in vram["reason"] and vram["gpus"] == []
        assert st["gpu"]["available"] is False and st["gpu"]["reason"] == vram["reason"]
        assert metric(url, "mloffload_gpu_available") == 0.0
    for key in ("total", "active", "queued", "completed", "failed", "cancelled", "rejected"):
        assert isinstance(st["requests"][key], int)
    assert st["uptime_seconds"] >= 0 and st["version"]
    info = httpx.get(url + "/api/backend/info").json()
    assert info["default_plan"]["n_gpu_layers"] == (19 if offload else 0)
    families = {f.name for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    assert {"mloffload_requests", "mloffload_tokens_generated",
            "mloffload_time_to_first_token_seconds", "mloffload_request_duration_seconds",
            "mloffload_queue_depth", "mloffload_models_loaded",
            "mloffload_model_load_seconds"} <= families
    assert metric(url, "mloffload_requests_total",
                  {"route": "/v1/chat/completions", "status": "200"}) > 0


def test_health_is_503_while_loading_and_requests_wait(lifecycle_server: ServerProcess) -> None:
    url = lifecycle_server.url
    assert chat(url, "default").status_code == 200  # "third" is not loaded
    seen: list[dict[str, Any]] = []
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        load = pool.submit(httpx.post, url + "/api/models/third/load", timeout=120)
        waiting = pool.submit(chat, url, "third")  # arrives while "third" is loading
        while not load.done():
            r = httpx.get(url + "/health", timeout=10)
            if r.status_code == 503:
                seen.append(r.json())
            time.sleep(0.01)
        assert load.result().status_code == 200
        assert waiting.result().status_code == 200  # it waited for the load, then ran
    assert seen, "never saw /health answer 503 during the load"
    assert seen[0]["status"] == "loading"
    assert seen[0]["error"]["code"] == "model_loading" and "third" in seen[0]["error"]["message"]
    assert httpx.get(url + "/health", timeout=10).status_code == 200
