"""The fast test layer: the real app (routes, guard, errors, schemas, manager, queue) over a
fake engine, driven in-process through ``httpx.ASGITransport``; no model, no sockets.

What the fake engine does is a ``Script`` that each test builds for itself, so no state is
shared between tests. The fake mirrors what the real engine does with its input where a
test depends on it (text is encoded to UTF-8 before tokenizing; embeddings stop between
inputs when cancelled).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from mloffload.config import settings_from
from mloffload.engine.base import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    Cancelled,
    Embeddings,
    GenerationResult,
    SamplingParams,
)
from mloffload.hardware.gpu import GPUSnapshot
from mloffload.hardware.planner import OffloadPlan, plan_for_settings
from mloffload.models.registry import ModelEntry, Registry
from mloffload.server.app import create_app
from mloffload.server.local.runtime import LocalRunner

ORIGIN = "http://127.0.0.1:9000"


def tiny_gguf(path: Path, name: str = "Tiny Test") -> Path:
    """A valid GGUF header with a few tiny tensors: enough for the registry and planner."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name(name)
    writer.add_context_length(256)
    writer.add_embedding_length(8)
    writer.add_block_count(2)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    for i in range(2):
        writer.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@dataclasses.dataclass
class Script:
    """What the fake engine does; one per test."""

    pieces: tuple[str, ...] = ("Hello", " there", "!")
    delay: float = 0.0  # seconds per piece, and per embedding input
    fail: BaseException | None = None  # raised at the prompt stage
    hold: threading.Event | None = None  # the prompt stage waits for it (a busy slot)
    started: threading.Event = dataclasses.field(default_factory=threading.Event)
    embedded: list[int] = dataclasses.field(default_factory=list)  # inputs done, per request
    params: list[SamplingParams] = dataclasses.field(default_factory=list)  # as generated


class FakeEngine:
    """The Engine protocol, scripted: text in, the script's pieces out."""

    def __init__(self, model_id: str, script: Script) -> None:
        self.model_id = model_id
        self.script = script
        self.closed = False

    def _prompt_stage(self, text: str, result: GenerationResult) -> None:
        self.script.started.set()
        if self.script.hold is not None:
            self.script.hold.wait(30)
        if self.script.fail is not None:
            raise self.script.fail
        result.prompt_tokens = len(text.encode("utf-8").split())  # as strict as llama.cpp

    def chat(self, messages: Sequence[dict[str, Any]], params: SamplingParams,
             result: GenerationResult, cancel: threading.Event) -> Iterator[str]:
        text = " ".join(str(m.get("content") or "") for m in messages)
        self._prompt_stage(text, result)
        return self._pieces(params, result, cancel)

    def complete(self, prompt: str, params: SamplingParams, result: GenerationResult,
                 cancel: threading.Event) -> Iterator[str]:
        self._prompt_stage(prompt, result)
        return self._pieces(params, result, cancel)

    def _pieces(self, params: SamplingParams, result: GenerationResult,
                cancel: threading.Event) -> Iterator[str]:
        self.script.params.append(params)
        limit = params.max_tokens or len(self.script.pieces)
        result.finish_reason = "stop"
        for n, piece in enumerate(self.script.pieces[:limit], start=1):
            if cancel.is_set():
                result.finish_reason = FINISH_CANCELLED
                return
            time.sleep(self.script.delay)
            result.completion_tokens = n
            yield piece
        if limit < len(self.script.pieces):
            result.finish_reason = FINISH_LENGTH

    def embed(self, texts: Sequence[str], cancel: threading.Event | None = None) -> Embeddings:
        self.script.embedded.append(0)
        vectors = []
        for i, text in enumerate(texts):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"stopped after {i} of {len(texts)} inputs")
            if i == 0:
                self._prompt_stage(text, GenerationResult())
            time.sleep(self.script.delay)
            vectors.append([1.0] + [0.0] * 7)
            self.script.embedded[-1] = i + 1
        return Embeddings(vectors, sum(len(t.split()) for t in texts))

    def info(self) -> dict[str, Any]:
        return {"model": self.model_id, "n_ctx": 256, "chat_format": "fake", "n_threads": 1,
                "model_bytes": 1024}

    def close(self) -> None:
        self.closed = True


class FakeRuntime:
    """Opens models as FakeEngines behind the in-process backend's own runner."""

    name = "llamacpp"

    def __init__(self, script: Script) -> None:
        self.script = script
        self.settings = settings_from({})

    @property
    def facts(self) -> dict[str, Any]:
        return {"available": True, "supports_gpu_offload": False, "fake": True}

    def plan(self, entry: ModelEntry) -> OffloadPlan:
        assert entry.info is not None
        return plan_for_settings(entry.info, self.settings, GPUSnapshot(False, "fake"), False)

    async def open(self, entry: ModelEntry, plan: OffloadPlan,
                   on_exit: Callable[[str], None]) -> tuple[LocalRunner, OffloadPlan]:
        engine = FakeEngine(entry.id, self.script)
        return LocalRunner(engine, ThreadPoolExecutor(1, thread_name_prefix="fake")), plan


@dataclasses.dataclass
class FastApp:
    client: httpx.AsyncClient
    app: Any
    registry: Registry
    script: Script
    model_path: Path

    async def counters(self) -> dict[str, int]:
        return dict((await self.client.get("/status")).json()["requests"])

    async def preloaded(self, key: str = "") -> None:
        """Wait for the start-up preload of the default model (milliseconds here)."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for _ in range(500):
            status = (await self.client.get("/status", headers=headers)).json()
            if status.get("loaded_models") and not status.get("loading"):
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the default model never loaded")

    async def settle(self, check: Callable[[dict[str, int]], bool]) -> dict[str, int]:
        """The counters once ``check`` holds for them (the worker thread ends on its own)."""
        for _ in range(500):
            counts = await self.counters()
            if check(counts):
                return counts
            await asyncio.sleep(0.01)
        raise AssertionError(f"counters never settled: {await self.counters()}")


async def leave_after(app: Any, path: str, body: dict[str, Any], seconds: float
                      ) -> list[dict[str, Any]]:
    """POST ``body`` and hang up after ``seconds``: from then on ``receive`` says
    ``http.disconnect``, as uvicorn tells an app whose client went away. Returns what the app
    sent (nothing reaches a client that left)."""
    import orjson

    sent: list[dict[str, Any]] = []
    delivered = False
    deadline = time.monotonic() + seconds

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": orjson.dumps(body), "more_body": False}
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "server": ("127.0.0.1", 9000), "client": ("127.0.0.1", 40000),
             "headers": [(b"host", b"127.0.0.1:9000"), (b"content-type", b"application/json")]}
    await app(scope, receive, send)
    return sent


@contextlib.asynccontextmanager
async def fast_app(tmp_path: Path, script: Script | None = None, **values: Any
                   ) -> AsyncIterator[FastApp]:
    """The app with its lifespan running, a registry holding one tiny model as default."""
    settings = settings_from({"data_dir": tmp_path, **values})
    registry = Registry(tmp_path / "registry.sqlite3")
    model = tiny_gguf(tmp_path / "models" / "tiny.gguf")
    registry.set_default(registry.register_file(model, "config").id)
    script = script or Script()
    app = create_app(settings, registry, runtime=FakeRuntime(script))
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url=ORIGIN) as client:
                fa = FastApp(client, app, registry, script, model)
                await fa.preloaded(values.get("api_key", ""))
                yield fa
    finally:
        registry.close()
