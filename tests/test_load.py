"""Load: 200 mixed requests, 50 at a time, against the real model with a small queue limit."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import ServerProcess

TOTAL = 200
CONCURRENCY = 50
QUEUE = 8


@pytest.fixture(scope="module")
def srv(data_dir: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(data_dir, env={"ML_OFFLOAD_N_CTX": "512",
                                        "ML_OFFLOAD_MAX_QUEUE": str(QUEUE)})
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def request_spec(i: int) -> tuple[str, dict[str, Any]]:
    kind = i % 4
    if kind == 0:
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Hi {i}"}],
                                        "max_tokens": 4}
    if kind == 1:
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Yo {i}"}],
                                        "max_tokens": 4, "stream": True,
                                        "stream_options": {"include_usage": True}}
    if kind == 2:
        return "/v1/completions", {"prompt": f"{i}, ", "max_tokens": 4, "stream": True}
    return "/v1/embeddings", {"input": [f"text {i}", "more"]}


async def one(client: httpx.AsyncClient, sem: asyncio.Semaphore, i: int) -> str:
    path, body = request_spec(i)
    async with sem:
        if body.get("stream"):
            async with client.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    return _error_outcome(r)
                lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]", lines[-3:]
            last = json.loads(lines[-2][6:])
            if last.get("usage"):
                last = json.loads(lines[-3][6:])
            assert last["choices"][0]["finish_reason"] in ("stop", "length"), last
            return "ok"
        r = await client.post(path, json=body)
        if r.status_code != 200:
            return _error_outcome(r)
        data = r.json()
        if path == "/v1/embeddings":
            assert [len(d["embedding"]) for d in data["data"]] == [640, 640]
        else:
            assert data["choices"][0]["finish_reason"] in ("stop", "length")
        return "ok"


def _error_outcome(r: httpx.Response) -> str:
    assert r.status_code == 429, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and set(err) == {"message", "type", "param",
                                                                   "code"}
    assert int(r.headers["Retry-After"]) >= 1
    return "429"


async def run_load(url: str) -> list[str]:
    sem = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        return await asyncio.gather(*(one(client, sem, i) for i in range(TOTAL)))


def test_two_hundred_mixed_requests(srv: ServerProcess) -> None:
    warm = asyncio.run(run_warmup(srv.url))
    assert warm == ["ok"] * 8
    rss_warm = srv.rss()
    before = httpx.get(srv.url + "/status").json()["requests"]
    outcomes = asyncio.run(asyncio.wait_for(run_load(srv.url), 900))
    after = httpx.get(srv.url + "/status").json()["requests"]
    rss_end = srv.rss()

    assert len(outcomes) == TOTAL
    assert set(outcomes) <= {"ok", "429"}
    assert outcomes.count("ok") >= QUEUE + 1  # one running and a full queue were served
    assert outcomes.count("429") > 0  # and really refused the overflow
    delta = {k: after[k] - before[k] for k in after}
    assert delta["total"] == TOTAL
    assert delta["completed"] == outcomes.count("ok")
    assert delta["rejected"] == outcomes.count("429")
    assert delta["completed"] + delta["rejected"] + delta["failed"] + delta["cancelled"] == TOTAL
    assert after["active"] == 0 and after["queued"] == 0
    assert abs(rss_end - rss_warm) <= 0.10 * rss_warm, (rss_warm, rss_end)
    print(f"load: {outcomes.count('ok')} ok, {outcomes.count('429')} rejected; "
          f"rss after warm-up {rss_warm / 2**20:.0f} MiB, at end {rss_end / 2**20:.0f} MiB")


async def run_warmup(url: str) -> list[str]:
    sem = asyncio.Semaphore(1)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        return [await one(client, sem, i) for i in range(8)]
