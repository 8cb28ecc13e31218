"""Managed mode's runtime: every loaded model is a supervised llama-server process.

Planning counts the KV cache of every slot (``--parallel``), so a plan that fits really
fits; slots are cut when memory says so (see ``plan_for_settings``). Crash loops back off:
an engine started again soon after a crash waits 1, 2, 4 … up to 30 s first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...config import Settings
from ...hardware.gpu import GPUProbe
from ...hardware.planner import OffloadPlan, plan_for_settings
from ...models.registry import ModelEntry
from ..runner import Runner
from .process import EngineProcess

log = logging.getLogger("mloffload.engines")

MAX_BACKOFF = 30.0
STABLE_AFTER = 60.0  # an engine that ran this long before dying starts its back-off afresh


def ram_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class EngineRuntime:
    name = "managed"

    def __init__(self, settings: Settings, gpu: GPUProbe, binary: Path, found_in: str) -> None:
        self.settings = settings
        self.gpu = gpu
        self.binary = str(binary)
        self.found_in = found_in
        self._facts: dict[str, Any] | None = None
        self._crashes: dict[str, tuple[int, float]] = {}  # model -> (in a row, last at)

    @property
    def facts(self) -> dict[str, Any]:
        if self._facts is None:
            self._facts = {"available": True, "kind": "llama-server", "binary": self.binary,
                           "found_in": self.found_in, **_binary_facts(self.binary)}
        return self._facts

    def plan(self, entry: ModelEntry) -> OffloadPlan:
        assert entry.info is not None
        snap = self.gpu.snapshot()
        # llama-server's own build decides what a GPU can do: any GPU NVML sees counts.
        offload = snap.available and self.facts.get("supports_gpu_offload") is not False
        return plan_for_settings(entry.info, self.settings, snap, offload,
                                 n_slots=self.settings.parallel, ram_available=ram_available())

    async def open(self, entry: ModelEntry, plan: OffloadPlan,
                   on_exit: Callable[[str], None]) -> tuple[Runner, OffloadPlan]:
        await self._back_off(entry.id)

        def exited(why: str) -> None:
            self._note_crash(entry.id, engine)
            on_exit(why)

        engine = EngineProcess(self.binary, entry, plan, self.settings, exited)
        await engine.start(self.settings.load_timeout)
        return engine, plan

    def _note_crash(self, mid: str, engine: EngineProcess) -> None:
        ran = time.monotonic() - (engine.ready_at or time.monotonic())
        count, _ = self._crashes.get(mid, (0, 0.0))
        count = 1 if ran >= STABLE_AFTER else count + 1
        self._crashes[mid] = (count, time.monotonic())

    async def _back_off(self, mid: str) -> None:
        count, last = self._crashes.get(mid, (0, 0.0))
        if count <= 1:
            return  # the first restart after a crash is immediate
        delay = min(MAX_BACKOFF, 2.0 ** (count - 2))
        left = last + delay - time.monotonic()
        if left > 0:
            log.warning("the engine of %s crashed %d times in a row; waiting %.0fs before "
                        "starting it again", mid, count, left)
            await asyncio.sleep(left)


def _binary_facts(binary: str) -> dict[str, Any]:
    """Version and devices of a llama-server binary (asked once; two quick runs)."""
    out: dict[str, Any] = {"version": None, "devices": [], "supports_gpu_offload": False}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        ver = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20)
        text = (ver.stdout + ver.stderr).strip().splitlines()
        out["version"] = next((ln for ln in text if ln.startswith("version")), None)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        dev = subprocess.run([binary, "--list-devices"], capture_output=True, text=True,
                             timeout=20)
        lines = [ln.strip() for ln in (dev.stdout + dev.stderr).splitlines()]
        devices = [ln for ln in lines if ln and ":" in ln and not ln.lower().startswith(
            ("available devices", "load_backend", "ggml_", "warning"))]
        out["devices"] = devices
        out["supports_gpu_offload"] = any(
            d.split(":", 1)[0].upper().startswith(("CUDA", "ROCM", "VULKAN", "METAL", "SYCL"))
            for d in devices)
    return out
