"""Fuzz the whole API from its own /openapi.json: no 5xx, every error in the OpenAI shape
(Ollama's on its own endpoints)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from helpers import ServerProcess
from mloffload.server.ollama.errors import is_ollama_path


@pytest.fixture(scope="module")
def fuzz_server(data_dir: Path) -> Iterator[ServerProcess]:
    # A token cap bounds every generation the fuzzer can ask for.
    proc = ServerProcess(data_dir, env={"ML_OFFLOAD_N_CTX": "256", "ML_OFFLOAD_MAX_TOKENS": "8",
                                        "ML_OFFLOAD_MAX_QUEUE": "4"})
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def check_response(case: Any, response: Any) -> None:
    status = response.status_code
    assert status < 500, (case.method, case.path, case.body, status, response.text[:500])
    if status >= 400:
        body = response.json()
        assert set(body) >= {"error"}, body
        if is_ollama_path(case.path):  # Ollama's endpoints answer in Ollama's shape
            assert set(body) == {"error"} and isinstance(body["error"], str), body
            assert body["error"]
            return
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@pytest.mark.timeout(1200)
def test_api_fuzz(fuzz_server: ServerProcess) -> None:
    """Every operation in /openapi.json, with valid and invalid generated inputs.

    (The schemathesis pytest plugin does not run on pytest 9 yet, so the hypothesis
    strategies are driven directly.)
    """
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    calls = 0
    slow: list[tuple[float, str, str, str]] = []
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            nonlocal calls
            calls += 1
            t = time.monotonic()
            response = case.call(base_url=fuzz_server.url, timeout=120)
            slow.append((time.monotonic() - t, case.method, case.path, str(case.body)[:200]))
            check_response(case, response)

        run()
    assert calls >= 14
    for row in sorted(slow, reverse=True)[:8]:
        print(f"{row[0]:.2f}s", *row[1:])


def test_server_still_serves_after_fuzzing(fuzz_server: ServerProcess) -> None:
    r = httpx.post(fuzz_server.url + "/v1/completions",
                   json={"prompt": "hello", "max_tokens": 100, "temperature": 0}, timeout=120)
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == 8  # ML_OFFLOAD_MAX_TOKENS caps it
    assert "Traceback" not in fuzz_server.log()
