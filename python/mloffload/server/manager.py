"""Model lifecycle: load on demand, one worker thread per model, FIFO queue, keep-alive, LRU swap.

Everything here runs on the event loop thread except the engine itself, which lives in its
model's single worker thread. State changes happen between awaits, so no locks are needed
beyond each model's FIFO gate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..config import Settings, parse_duration
from ..engine.base import EngineError
from ..engine.llamacpp import LlamaCppEngine, LoadOptions, engine_facts
from ..gpu import GPUProbe
from ..planner import OffloadPlan, plan_for_settings, plan_offload
from ..registry import ModelEntry, Registry
from .errors import APIError, model_not_found
from .stats import Stats

log = logging.getLogger("mloffload.manager")


class LoadedModel:
    def __init__(self, entry: ModelEntry, engine: LlamaCppEngine, plan: OffloadPlan,
                 executor: ThreadPoolExecutor, keep_alive: float) -> None:
        self.entry = entry
        self.engine = engine
        self.plan = plan
        self.executor = executor
        self.gate = asyncio.Lock()  # FIFO: asyncio wakes waiters in arrival order
        self.loaded_at = time.time()
        self.last_used = time.time()
        self.keep_alive = keep_alive
        self.unload_at: float | None = None
        self.unload_handle: asyncio.TimerHandle | None = None
        self.job_seconds = 1.0  # moving average, for Retry-After

    @property
    def id(self) -> str:
        return self.entry.id

    def status(self) -> dict[str, Any]:
        left = None if self.unload_at is None else max(0.0, self.unload_at - time.time())
        info = self.engine.info()
        return {
            "id": self.id,
            "path": self.entry.path,
            "n_gpu_layers": self.plan.n_gpu_layers,
            "max_layers": self.plan.max_layers,
            "plan": self.plan.to_dict(),
            "memory": {
                "model_bytes": info["model_bytes"],
                "gpu_bytes_planned": self.plan.gpu_bytes,
                "cpu_bytes_planned": self.plan.cpu_bytes,
            },
            "n_ctx": info["n_ctx"],
            "chat_format": info["chat_format"],
            "busy": self.gate.locked(),
            "loaded_at": self.loaded_at,
            "last_used": self.last_used,
            "load_seconds": info["load_seconds"],
            "keep_alive_seconds": self.keep_alive,
            "keep_alive_left_seconds": None if left is None else round(left, 1),
        }


class Lease:
    """A request's turn on a model: held from the front of the queue until its job ends."""

    def __init__(self, manager: ModelManager, model: LoadedModel, keep_alive: float | None):
        self.manager = manager
        self.model = model
        self.keep_alive = keep_alive
        self.started = time.monotonic()
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        m = self.model
        m.job_seconds = 0.8 * m.job_seconds + 0.2 * (time.monotonic() - self.started)
        m.gate.release()
        self.manager._on_release(m, self.keep_alive)


def parse_keep_alive(value: str | float | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise APIError(400, f"Invalid value for 'keep_alive': {exc}", param="keep_alive",
                       code="invalid_value") from None


class ModelManager:
    def __init__(self, settings: Settings, registry: Registry, gpu: GPUProbe, stats: Stats):
        self.settings = settings
        self.registry = registry
        self.gpu = gpu
        self.stats = stats
        self.loaded: OrderedDict[str, LoadedModel] = OrderedDict()  # least recently used first
        self._loading: dict[str, asyncio.Task[LoadedModel]] = {}
        self._demand: dict[str, int] = {}  # requests admitted per model id, waiting or running
        self._changed = asyncio.Event()
        self._facts: dict[str, Any] | None = None
        self.last_load_error: str | None = None
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- facts ------------------------------------------------------------------------

    @property
    def facts(self) -> dict[str, Any]:
        if self._facts is None:
            self._facts = engine_facts()
        return self._facts

    def loading(self) -> list[str]:
        return list(self._loading)

    def resolve(self, name: str) -> ModelEntry:
        entry = self.registry.resolve(name)
        if entry is None:
            raise model_not_found(name)
        if not entry.usable or entry.info is None:
            raise APIError(500, f"The model {entry.id!r} cannot be used: {entry.reason}",
                           code="model_unusable", param="model")
        return entry

    def plan(self, entry: ModelEntry) -> OffloadPlan:
        assert entry.info is not None
        return plan_for_settings(entry.info, self.settings, self.gpu.snapshot(),
                                 bool(self.facts.get("supports_gpu_offload")))

    # --- admission ----------------------------------------------------------------------

    async def acquire(self, name: str, keep_alive: float | None = None) -> Lease:
        """Wait for this request's turn on the model, loading it first if needed."""
        entry = self.resolve(name)
        mid = entry.id
        running = 1 if (m := self.loaded.get(mid)) is not None and m.gate.locked() else 0
        waiting = self._demand.get(mid, 0) - running
        if waiting >= self.settings.max_queue and (running or waiting):
            retry = max(1, round((waiting + 1) * (m.job_seconds if m else 1.0)))
            raise APIError(
                429,
                f"The queue for model {mid!r} is full ({waiting} waiting); retry later.",
                code="rate_limit_exceeded", headers={"Retry-After": str(retry)},
            )
        self._demand[mid] = self._demand.get(mid, 0) + 1
        self.stats.enqueue()
        granted = False
        try:
            model = await self._ensure_loaded(entry)
            self._cancel_unload(model)
            await model.gate.acquire()
            granted = True
            self.loaded.move_to_end(mid)
            model.last_used = time.time()
            return Lease(self, model, keep_alive)
        finally:
            self.stats.dequeue()
            if not granted:
                self._drop_demand(mid)

    def _drop_demand(self, mid: str) -> None:
        self._demand[mid] -= 1
        if self._demand[mid] == 0:
            del self._demand[mid]
            model = self.loaded.get(mid)
            if model is not None:
                self._schedule_unload(model)
        self._changed.set()

    def _on_release(self, model: LoadedModel, keep_alive: float | None) -> None:
        model.last_used = time.time()
        if keep_alive is not None:
            model.keep_alive = keep_alive
        self._drop_demand(model.id)

    # --- keep-alive -------------------------------------------------------------------

    def _cancel_unload(self, model: LoadedModel) -> None:
        if model.unload_handle is not None:
            model.unload_handle.cancel()
        model.unload_handle = None
        model.unload_at = None

    def _schedule_unload(self, model: LoadedModel) -> None:
        self._cancel_unload(model)
        if self._closed or self._demand.get(model.id):
            return
        ttl = model.keep_alive
        if ttl < 0:
            return
        loop = asyncio.get_running_loop()
        if ttl == 0:
            self._spawn(self.unload(model.id, reason="keep_alive 0"))
            return
        model.unload_at = time.time() + ttl
        model.unload_handle = loop.call_later(
            ttl, lambda: self._spawn(self.unload(model.id, reason="idle"))
        )

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- loading --------------------------------------------------------------------------

    async def _ensure_loaded(self, entry: ModelEntry) -> LoadedModel:
        model = self.loaded.get(entry.id)
        if model is not None:
            return model
        task = self._loading.get(entry.id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(entry))
            self._loading[entry.id] = task
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.settings.load_timeout)
        except TimeoutError:
            raise APIError(503, f"Model {entry.id!r} is still loading; try again shortly.",
                           code="model_loading", headers={"Retry-After": "5"}) from None

    async def load(self, name: str) -> LoadedModel:
        """Load without a request (admin endpoint and preload); keep-alive starts at once."""
        entry = self.resolve(name)
        model = await self._ensure_loaded(entry)
        if not self._demand.get(model.id) and model.unload_handle is None:
            self._schedule_unload(model)
        return model

    async def _load(self, entry: ModelEntry) -> LoadedModel:
        try:
            await self._make_room(entry.id)
            plan = self.plan(entry)
            log.info("offload plan for %s: %d/%d layers on GPU (%s)", entry.id,
                     plan.n_gpu_layers, plan.max_layers, plan.reason)
            started = time.monotonic()
            try:
                engine = await asyncio.to_thread(self._open_engine, entry, plan.n_gpu_layers)
            except EngineError as first:
                if plan.n_gpu_layers <= 0:
                    raise
                fewer = plan.n_gpu_layers // 2
                log.warning("load of %s with %d GPU layers failed (%s); retrying with %d",
                            entry.id, plan.n_gpu_layers, first, fewer)
                assert entry.info is not None
                plan = plan_offload(entry.info, n_ctx=plan.n_ctx, free_vram=plan.free_vram_bytes,
                                    margin=plan.margin_bytes, requested=fewer)
                engine = await asyncio.to_thread(self._open_engine, entry, fewer)
            self.stats.load_seconds.observe(time.monotonic() - started)
            executor = ThreadPoolExecutor(1, thread_name_prefix=f"model-{entry.id}")
            model = LoadedModel(entry, engine, plan, executor, self.settings.keep_alive)
            self.loaded[entry.id] = model
            self.stats.loaded.set(len(self.loaded))
            self.last_load_error = None
            if not self._demand.get(entry.id):
                self._schedule_unload(model)
            return model
        except EngineError as exc:
            self.last_load_error = f"{entry.id}: {exc}"
            raise APIError(503, f"Model {entry.id!r} failed to load: {exc}",
                           code="model_load_failed") from None
        finally:
            self._loading.pop(entry.id, None)

    def _open_engine(self, entry: ModelEntry, n_gpu_layers: int) -> LlamaCppEngine:
        assert entry.info is not None
        return LlamaCppEngine(entry.id, entry.info, LoadOptions(
            n_ctx=self.settings.n_ctx,
            n_threads=self.settings.effective_threads,
            n_gpu_layers=n_gpu_layers,
            main_gpu=self.settings.gpu,
        ))

    async def _make_room(self, wanted: str) -> None:
        deadline = time.monotonic() + self.settings.load_timeout
        while len(self.loaded) >= self.settings.max_loaded:
            idle = [m for m in self.loaded.values()
                    if not self._demand.get(m.id) and not m.gate.locked() and m.id != wanted]
            if idle:
                await self.unload(idle[0].id, reason=f"swapped out for {wanted}")
                continue
            self._changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise APIError(503, f"No model slot freed up for {wanted!r} in time; "
                               f"all {self.settings.max_loaded} loaded models are busy.",
                               code="model_slots_busy", headers={"Retry-After": "5"})
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                continue

    async def unload(self, mid: str, reason: str = "requested") -> bool:
        model = self.loaded.get(mid)
        if model is None or self._demand.get(mid) or model.gate.locked():
            return False
        del self.loaded[mid]
        self._cancel_unload(model)
        self.stats.loaded.set(len(self.loaded))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(model.executor, model.engine.close)
        model.executor.shutdown(wait=False)
        log.info("unloaded %s (%s)", mid, reason)
        self._changed.set()
        return True

    async def close(self) -> None:
        self._closed = True
        for task in list(self._loading.values()):
            task.cancel()
        for model in list(self.loaded.values()):
            self._cancel_unload(model)
            try:
                await asyncio.get_running_loop().run_in_executor(model.executor,
                                                                  model.engine.close)
            finally:
                model.executor.shutdown(wait=False)
        self.loaded.clear()

    def status(self) -> list[dict[str, Any]]:
        return [m.status() for m in self.loaded.values()]
