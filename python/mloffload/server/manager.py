"""Model lifecycle: load on demand, slots and a FIFO queue per model, keep-alive, LRU swap.

The manager does not know how a model runs. A ``Runtime`` opens a loaded model as a
``Runner``: llama.cpp in this process (one slot, its own worker thread) or a llama-server
child process (``--parallel`` slots, see ``server/engines``). Everything here runs on the
event loop; state changes happen between awaits, so no locks are needed.

A runner that dies (an engine process killed by a signal, say) is dropped at once: the
requests on it fail on their own, and the next request for the model loads it again.

Longer than most modules here: load, queue, keep-alive and swap change the same state
(``loaded``, ``_loading``, the queues) between awaits, and that only stays race-free to read
when it is in one place. The slots and the queue themselves are in ``slots.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

from ..config import Settings, parse_duration
from ..engine.base import EngineError
from ..hardware.gpu import GPUProbe
from ..hardware.planner import OffloadPlan
from ..models.registry import ModelEntry, Registry, file_changed
from .errors import APIError, model_not_found
from .runner import Runner, Runtime
from .slots import SlotGate
from .stats import Stats

log = logging.getLogger("mloffload.manager")


class LoadedModel:
    def __init__(self, entry: ModelEntry, runner: Runner, plan: OffloadPlan,
                 keep_alive: float, load_seconds: float) -> None:
        self.entry = entry
        self.runner = runner
        self.plan = plan
        self.gate = SlotGate(runner.slots)
        self.loaded_at = time.time()
        self.last_used = time.time()
        self.keep_alive = keep_alive
        self.load_seconds = load_seconds
        self.unload_at: float | None = None
        self.unload_handle: asyncio.TimerHandle | None = None
        self.job_seconds = 1.0  # moving average, for Retry-After
        self.dead = False

    @property
    def id(self) -> str:
        return self.entry.id

    def status(self) -> dict[str, Any]:
        left = None if self.unload_at is None else max(0.0, self.unload_at - time.time())
        out: dict[str, Any] = {
            "id": self.id,
            "path": self.entry.path,
            "n_gpu_layers": self.plan.n_gpu_layers,
            "max_layers": self.plan.max_layers,
            "plan": self.plan.to_dict(),
            "memory": {
                "model_bytes": self.entry.size,
                "gpu_bytes_planned": self.plan.gpu_bytes,
                "cpu_bytes_planned": self.plan.cpu_bytes,
            },
            "n_ctx": self.plan.n_ctx,
            "slots": {"total": self.gate.slots, "busy": self.gate.busy,
                      "free": self.gate.slots - self.gate.busy, "waiting": self.gate.waiting},
            "busy": self.gate.busy > 0,
            "loaded_at": self.loaded_at,
            "last_used": self.last_used,
            "load_seconds": round(self.load_seconds, 3),
            "keep_alive_seconds": self.keep_alive,
            "keep_alive_left_seconds": None if left is None else round(left, 1),
        }
        out.update(self.runner.describe())
        return out


class Lease:
    """A request's slot on a model: held from the front of the queue until its job ends."""

    def __init__(self, manager: ModelManager, model: LoadedModel, keep_alive: float | None,
                 waited: float = 0.0):
        self.manager = manager
        self.model = model
        self.keep_alive = keep_alive
        self.waited = waited  # seconds from arrival to the slot: the queue and any load
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
    """A request's keep_alive: a finite number of seconds or a duration string."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise APIError(400, f"Invalid value for 'keep_alive': {exc}", param="keep_alive",
                       code="invalid_value") from None


CRASH_LOOP = 3  # failed loads in a row that mark a model unusable
CRASH_LOOP_REASON = "its engine failed to start"

OnWait = Callable[[int], None]  # told how many wait ahead, while a request is queued


class Ticket:
    """An admitted request on its way to a slot (see ``ModelManager.admit``)."""

    def __init__(self, manager: ModelManager, entry: ModelEntry, keep_alive: float | None
                 ) -> None:
        self.manager = manager
        self.entry = entry
        self.keep_alive = keep_alive
        self.admitted = time.monotonic()
        self._used = False

    async def wait(self, on_wait: OnWait | None = None) -> Lease:
        assert not self._used, "a ticket is waited on once"
        self._used = True
        manager, mid = self.manager, self.entry.id
        granted = False
        try:
            model = await manager._ensure_loaded(self.entry)
            manager._cancel_unload(model)
            gate = model.gate
            await gate.acquire(None if on_wait is None else
                               lambda fut: manager._tell_position(gate, fut, on_wait))
            granted = True
            if mid in manager.loaded:
                manager.loaded.move_to_end(mid)
            model.last_used = time.time()
            waited = time.monotonic() - self.admitted
            manager.stats.queue_wait.observe(waited)
            return Lease(manager, model, self.keep_alive, waited)
        finally:
            manager.stats.dequeue()
            if not granted:
                manager._drop_demand(mid)

    def abandon(self) -> None:
        """The request left before waiting (its client went away)."""
        if not self._used:
            self._used = True
            self.manager.stats.dequeue()
            self.manager._drop_demand(self.entry.id)


class ModelManager:
    def __init__(self, settings: Settings, registry: Registry, gpu: GPUProbe, stats: Stats,
                 runtime: Runtime) -> None:
        self.settings = settings
        self.registry = registry
        self.gpu = gpu
        self.stats = stats
        self.runtime = runtime
        self.loaded: OrderedDict[str, LoadedModel] = OrderedDict()  # least recently used first
        self._loading: dict[str, asyncio.Task[LoadedModel]] = {}
        self._demand: dict[str, int] = {}  # requests admitted per model id, waiting or running
        self._changed = asyncio.Event()
        self.last_load_error: str | None = None
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.crashes: dict[str, int] = {}  # per model: runners that died by themselves
        self.restarts: dict[str, int] = {}  # per model: loads after such a death
        self._crashed: set[str] = set()  # died; the next load counts as a restart
        self._load_failures: dict[str, int] = {}  # per model: failed loads in a row

    # --- facts ------------------------------------------------------------------------

    @property
    def facts(self) -> dict[str, Any]:
        return self.runtime.facts

    def loading(self) -> list[str]:
        return list(self._loading)

    def resolve(self, name: str) -> ModelEntry:
        entry = self.registry.resolve(name)
        if entry is None:
            raise model_not_found(name)
        entry = self.registry.verify(entry.id) or entry  # the file as it is now
        self._retire_if_stale(entry.id)
        if not entry.usable or entry.info is None:
            raise APIError(500, f"The model {entry.id!r} cannot be used: {entry.reason}",
                           code="model_unusable", param="model")
        return entry

    def plan(self, entry: ModelEntry) -> OffloadPlan:
        return self.runtime.plan(entry)

    # --- admission ----------------------------------------------------------------------

    def must_wait(self, name: str) -> bool:
        """Whether a request for ``name`` would queue behind busy slots right now."""
        entry = self.registry.resolve(name)
        m = self.loaded.get(entry.id) if entry is not None else None
        return m is not None and (m.gate.locked() or m.gate.waiting > 0)

    def admit(self, name: str, keep_alive: float | None = None) -> Ticket:
        """Let a request in, or refuse it: unknown model (404), unusable (500), queue full
        (429). Past the busy slots, ``max_queue`` requests may wait. The ticket must then be
        waited on (``Ticket.wait``) or given up (``Ticket.abandon``)."""
        entry = self.resolve(name)
        mid = entry.id
        m = self.loaded.get(mid)
        slots = m.gate.slots if m is not None else 1
        running = m.gate.busy if m is not None else 0
        waiting = self._demand.get(mid, 0) - running
        if waiting >= self.settings.max_queue and (running or waiting):
            per_slot = (m.job_seconds if m else 1.0) / slots
            retry = max(1, round((waiting + 1) * per_slot))
            raise APIError(
                429,
                f"The queue for model {mid!r} is full ({running} running, {waiting} waiting, "
                f"max_queue {self.settings.max_queue}); retry later.",
                code="rate_limit_exceeded", headers={"Retry-After": str(retry)},
            )
        self._demand[mid] = self._demand.get(mid, 0) + 1
        self.stats.enqueue()
        return Ticket(self, entry, keep_alive)

    async def acquire(self, name: str, keep_alive: float | None = None,
                      on_wait: OnWait | None = None) -> Lease:
        """Wait for this request's slot on the model, loading it first if needed.
        ``on_wait`` hears how many wait ahead whenever the request has to wait."""
        return await self.admit(name, keep_alive).wait(on_wait)

    def _tell_position(self, gate: SlotGate, fut: asyncio.Future[None], on_wait: OnWait
                       ) -> None:
        """Tell a queued request its place now and every second until it is served."""
        def tick() -> None:
            if fut.done():
                return
            on_wait(gate.ahead_of(fut))
            asyncio.get_running_loop().call_later(1.0, tick)

        tick()

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
        if self._closed or self._demand.get(model.id) or model.dead:
            return
        ttl = model.keep_alive
        if ttl < 0:
            return
        if ttl == 0:
            self._spawn(self.unload(model.id, reason="keep_alive 0"))
            return
        model.unload_at = time.time() + ttl
        model.unload_handle = asyncio.get_running_loop().call_later(
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

    async def load(self, name: str, explicit: bool = False,
                   keep_alive: float | None = None) -> LoadedModel:
        """Load without a request (admin endpoint, preload, Ollama's empty prompt); keep-alive
        starts at once. ``explicit`` (someone asked for it): a model marked unusable after a
        crash loop is given another chance. ``keep_alive`` replaces the model's own and
        restarts its timer."""
        if explicit and (marked := self.registry.resolve(name)) is not None \
                and not marked.usable and marked.reason.startswith(CRASH_LOOP_REASON):
            self.registry.clear_unusable(marked.id)
            self._load_failures.pop(marked.id, None)
        entry = self.resolve(name)
        model = await self._ensure_loaded(entry)
        if keep_alive is not None:
            model.keep_alive = keep_alive
        if not self._demand.get(model.id) and (keep_alive is not None
                                               or model.unload_handle is None):
            self._schedule_unload(model)
        return model

    async def _load(self, entry: ModelEntry) -> LoadedModel:
        try:
            await self._make_room(entry.id)
            plan = self.plan(entry)
            log.info("offload plan for %s: %d/%d layers on GPU (%s)", entry.id,
                     plan.n_gpu_layers, plan.max_layers, plan.reason)
            started = time.monotonic()
            runner, plan = await self.runtime.open(
                entry, plan, lambda why: self._on_runner_exit(entry.id, why))
            seconds = time.monotonic() - started
            self.stats.load_seconds.observe(seconds)
            model = LoadedModel(entry, runner, plan, self.settings.keep_alive, seconds)
            if entry.id in self._crashed:
                self._crashed.discard(entry.id)
                self.restarts[entry.id] = self.restarts.get(entry.id, 0) + 1
                self.stats.engine_restarts.labels(entry.id).inc()
            self.loaded[entry.id] = model
            self.stats.loaded.set(len(self.loaded))
            self.last_load_error = None
            self._load_failures.pop(entry.id, None)
            if not self._demand.get(entry.id):
                self._schedule_unload(model)
            return model
        except EngineError as exc:
            self.last_load_error = f"{entry.id}: {exc}"
            failures = self._load_failures.get(entry.id, 0) + 1
            self._load_failures[entry.id] = failures
            if failures >= CRASH_LOOP:
                reason = (f"{CRASH_LOOP_REASON} {failures} times in a row (last: {exc}); "
                          "it is used again once its file changes or it is loaded explicitly")
                self.registry.mark_unusable(entry.id, reason)
                log.error("model %s marked unusable: %s", entry.id, reason)
            raise APIError(503, f"Model {entry.id!r} failed to load: {exc}",
                           code="model_load_failed") from None
        finally:
            self._loading.pop(entry.id, None)

    def _on_runner_exit(self, mid: str, why: str) -> None:
        """A runner died by itself: forget it now; its requests fail on their own."""
        model = self.loaded.get(mid)
        if model is None or model.dead:
            return
        model.dead = True
        del self.loaded[mid]
        self._cancel_unload(model)
        self.stats.loaded.set(len(self.loaded))
        self.crashes[mid] = self.crashes.get(mid, 0) + 1
        self.stats.engine_crashes.labels(mid).inc()
        self._crashed.add(mid)
        log.error("the engine of %s died: %s", mid, why)
        self._spawn(model.runner.close())
        self._changed.set()

    def pinned_ids(self) -> list[str]:
        """The default model, and the FIM model too when it is another one and max_loaded
        has room for both: loaded at start, and swapped out only when nothing else can be."""
        out: list[str] = []
        default = self.registry.default_id()
        if default is not None:
            out.append(default)
        fim = self.registry.resolve(self.settings.fim_model) if self.settings.fim_model \
            else None
        if fim is not None and fim.id not in out and self.settings.max_loaded >= 2:
            out.append(fim.id)
        return out

    async def preload(self) -> None:
        """Load the pinned models now (at start), one after the other."""
        for model_id in self.pinned_ids():
            try:
                await self.load(model_id)
            except APIError as exc:
                log.error("preloading model %s failed: %s", model_id, exc.message)

    async def _make_room(self, wanted: str) -> None:
        deadline = time.monotonic() + self.settings.load_timeout
        pinned = set(self.pinned_ids())
        while len(self.loaded) >= self.settings.max_loaded:
            idle = [m for m in self.loaded.values()
                    if not self._demand.get(m.id) and m.gate.busy == 0 and m.id != wanted]
            idle.sort(key=lambda m: m.id in pinned)  # least recently used first otherwise
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
        if model is None or self._demand.get(mid) or model.gate.busy:
            return False
        self._forget(model)
        await model.runner.close()
        log.info("unloaded %s (%s)", mid, reason)
        self._changed.set()
        return True

    def _forget(self, model: LoadedModel) -> None:
        del self.loaded[model.id]
        self._cancel_unload(model)
        self.stats.loaded.set(len(self.loaded))
        model.dead = True

    def _retire_if_stale(self, mid: str) -> None:
        """A loaded model whose file changed on disk must not touch its mapped weights
        again (a truncated file kills the process that does: SIGBUS). Idle, it is dropped
        now, and the request loads the file afresh; busy, it unloads once its queue is
        served (the backend refuses to run on it meanwhile, see file_changed)."""
        model = self.loaded.get(mid)
        if model is None or not file_changed(model.entry):
            return
        model.keep_alive = 0
        if self._demand.get(mid) or model.gate.busy:
            return
        self._forget(model)
        log.warning("unloaded %s: its file changed on disk", mid)
        self._spawn(model.runner.close())
        self._changed.set()

    async def close(self) -> None:
        self._closed = True
        for task in list(self._loading.values()):
            task.cancel()
        for model in list(self.loaded.values()):
            self._cancel_unload(model)
            model.dead = True
            await model.runner.close()
        self.loaded.clear()
        for task in list(self._tasks):
            task.cancel()

    def status(self) -> list[dict[str, Any]]:
        return [m.status() for m in self.loaded.values()]

    def engine_counts(self) -> dict[str, dict[str, int]]:
        """Crashes and restarts per model, for `/status`."""
        ids = sorted(set(self.crashes) | set(self.restarts))
        return {i: {"crashes": self.crashes.get(i, 0), "restarts": self.restarts.get(i, 0)}
                for i in ids}
