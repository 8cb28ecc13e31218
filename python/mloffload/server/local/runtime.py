"""llama.cpp inside the server process (``--backend llamacpp``): one slot per model.

Each loaded model gets one worker thread; the engine is single-threaded by design, and the
model's slot gate in the manager serialises its requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ...config import Settings
from ...engine.base import Engine, EngineError
from ...engine.llamacpp import LlamaCppUnavailable, engine_facts
from ...engine.loader import open_model
from ...hardware.gpu import GPUProbe
from ...hardware.planner import OffloadPlan, plan_for_settings
from ...models.registry import ModelEntry


class LocalRunner:
    slots = 1

    def __init__(self, engine: Engine, executor: ThreadPoolExecutor) -> None:
        self.engine = engine
        self.executor = executor

    def describe(self) -> dict[str, Any]:
        info = self.engine.info()
        return {"n_ctx": info["n_ctx"], "chat_format": info["chat_format"],
                "engine": {"kind": "in-process", "n_threads": info["n_threads"],
                           "model_bytes": info["model_bytes"]}}

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.executor, self.engine.close)
        finally:
            self.executor.shutdown(wait=False)


class LocalRuntime:
    name = "llamacpp"

    def __init__(self, settings: Settings, gpu: GPUProbe) -> None:
        self.settings = settings
        self.gpu = gpu
        self._facts: dict[str, Any] | None = None

    @property
    def facts(self) -> dict[str, Any]:
        if self._facts is None:
            self._facts = engine_facts()
        return self._facts

    def plan(self, entry: ModelEntry) -> OffloadPlan:
        assert entry.info is not None
        return plan_for_settings(entry.info, self.settings, self.gpu.snapshot(),
                                 bool(self.facts.get("supports_gpu_offload")))

    async def open(self, entry: ModelEntry, plan: OffloadPlan,
                   on_exit: Callable[[str], None]) -> tuple[LocalRunner, OffloadPlan]:
        # In-process there is nothing to outlive us: a native fault takes the server too.
        try:
            engine, plan = await asyncio.to_thread(
                open_model, entry, plan, n_threads=self.settings.effective_threads,
                main_gpu=self.settings.gpu, embedding_memory=self.settings.embedding_memory)
        except LlamaCppUnavailable as exc:
            raise EngineError(str(exc)) from exc
        executor = ThreadPoolExecutor(1, thread_name_prefix=f"model-{entry.id}")
        return LocalRunner(engine, executor), plan
