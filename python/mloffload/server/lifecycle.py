"""What the in-process and the managed backends share: both run the registry's models
through a ModelManager, so their lifecycle (start, stop, load, unload) and their facts
(`/v1/models`, health, `/api/backend/info`) are the manager's, told in their own words."""

from __future__ import annotations

import asyncio
from typing import Any

from ..config import Settings
from ..models.catalog import default_model_problem
from .backend import Health, HealthState
from .errors import APIError
from .manager import ModelManager
from .stats import Stats


class ManagerBackend:
    """The base of LocalBackend and ManagedBackend; requests are theirs."""

    name = ""
    # How health says where the models run: while loading, once loaded, before any load.
    LOADING = "loading model {}"
    READY = "ready; loaded: {}"
    IDLE = "models load on demand"

    def __init__(self, settings: Settings, manager: ModelManager, stats: Stats) -> None:
        self.settings = settings
        self.manager = manager
        self.stats = stats
        self._preload: asyncio.Task[Any] | None = None

    async def startup(self) -> None:
        self._preload = asyncio.get_running_loop().create_task(self.manager.preload())

    async def shutdown(self) -> None:
        if self._preload is not None:
            self._preload.cancel()
        await self.manager.close()

    # --- lifecycle ------------------------------------------------------------------------

    async def load(self, name: str, keep_alive: float | None = None) -> dict[str, Any]:
        loaded = await self.manager.load(name, explicit=True, keep_alive=keep_alive)
        return {"loaded": True, **loaded.status()}

    async def unload(self, name: str) -> dict[str, Any]:
        entry = self.manager.resolve(name)
        if entry.id not in self.manager.loaded:
            return {"unloaded": False, "id": entry.id, "reason": "not loaded"}
        if not await self.manager.unload(entry.id, reason="requested"):
            raise APIError(409, f"Model {entry.id!r} is busy; try again when its requests "
                           "finish.", code="model_busy", type="conflict_error")
        return {"unloaded": True, "id": entry.id}

    # --- facts ----------------------------------------------------------------------------

    async def models(self) -> dict[str, Any]:
        loaded = set(self.manager.loaded)
        registry = self.manager.registry
        entries = [registry.verify(e.id) or e for e in registry.list()]
        return {"object": "list", "data": [e.card(loaded=e.id in loaded) for e in entries]}

    def _engine_problem(self) -> str:
        """Why no model can run at all (the engine cannot be used), or ""."""
        return ""

    async def health(self) -> Health:
        reason = self._engine_problem() or default_model_problem(self.manager.registry)
        if reason:
            return Health(HealthState.UNAVAILABLE, reason,
                          {"available": False, "ready": False, "details": reason})
        loading = self.manager.loading()
        if loading:
            details = self.LOADING.format(", ".join(loading))
            return Health(HealthState.LOADING, details,
                          {"available": True, "ready": False, "details": details})
        loaded = list(self.manager.loaded)
        if loaded:
            details = self.READY.format(", ".join(loaded))
        else:
            details = self.IDLE
            if self.manager.last_load_error:
                details += f" (last load failed: {self.manager.last_load_error})"
        return Health(HealthState.READY, "", {"available": True, "ready": True,
                                               "details": details})

    def _info_extra(self) -> dict[str, Any]:
        """What a backend adds to `/api/backend/info`."""
        return {}

    def _settings_extra(self) -> dict[str, Any]:
        """The settings a backend adds to that answer's ``settings``."""
        return {}

    async def info(self) -> dict[str, Any]:
        registry = self.manager.registry
        default_id = registry.default_id()
        default = registry.get(default_id) if default_id else None
        plan = None
        if default is not None and default.usable:
            plan = self.manager.plan(default).to_dict()
        s = self.settings
        return {
            "backend": self.name,
            **self._info_extra(),
            "engine": self.manager.facts,
            "default_model": default.summary() if default else None,
            "default_plan": plan,
            "loaded_models": self.manager.status(),
            "settings": {
                "n_ctx": s.n_ctx, **self._settings_extra(),
                "n_gpu_layers": "auto" if s.n_gpu_layers is None else s.n_gpu_layers,
                "threads": s.effective_threads, "max_loaded": s.max_loaded,
                "keep_alive_seconds": s.keep_alive,
            },
        }
