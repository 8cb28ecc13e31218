r"""How a loaded model runs, as the model manager sees it: a ``Runtime`` opens ``Runner``\s.

Two runtimes exist: llama.cpp inside the server (``server/local/runtime.py``, one slot) and
a llama-server child process per model (``server/engines/runtime.py``, ``--parallel`` slots).
Tests give the app a runtime of their own (``create_app(..., runtime=...)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ..hardware.planner import OffloadPlan
from ..models.registry import ModelEntry


class Runner(Protocol):
    """One loaded model, however it runs."""

    @property
    def slots(self) -> int:
        """Requests it decodes at once."""
        ...

    def describe(self) -> dict[str, Any]:
        """Its part of the model's `/status` entry (engine facts, process, memory)."""
        ...

    async def close(self) -> None:
        """Free everything it holds; for a process, the process has exited on return."""
        ...


class Runtime(Protocol):
    name: str

    @property
    def facts(self) -> dict[str, Any]:
        """What the engine can do (`/api/backend/info` → engine)."""
        ...

    def plan(self, entry: ModelEntry) -> OffloadPlan: ...

    async def open(self, entry: ModelEntry, plan: OffloadPlan,
                   on_exit: Callable[[str], None]) -> tuple[Runner, OffloadPlan]:
        """Load the model; returns it and the plan it really runs with (a load may have
        been retried with fewer GPU layers). Raises EngineError with the reason when it
        cannot. ``on_exit`` is called (on the loop) if the runner later dies by itself."""
        ...
