"""Start and supervise llama.cpp's own ``llama-server`` (``--llama-server-bin PATH``).

The supervised server gets the registry's default model, the command line of an engine
process (``server/engines``: the planner's ``-ngl``, ``--parallel`` slots with the full
context each, mean-pooled embeddings), and the host and port of ``llamacpp_url``. If it
dies it is started again, after a pause that doubles with each quick failure (1 s up to
30 s). Its output goes to ``<data_dir>/llama-server.log`` (the previous one, past 16 MiB,
to ``.log.1``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import IO, Any
from urllib.parse import urlsplit

from ...config import ConfigError, Settings
from ...hardware.gpu import GPUProbe
from ...hardware.planner import OffloadPlan, plan_for_settings
from ...models.registry import ModelEntry, Registry
from ..engines.process import die_with_parent, engine_args

log = logging.getLogger("mloffload.llama_server")

MIN_BACKOFF = 1.0
MAX_BACKOFF = 30.0
STABLE_AFTER = 60.0  # a run this long resets the back-off
LOG_KEEP = 16 * 1024**2


def loopback_port(url: str) -> tuple[str, int]:
    """The host and port llama-server should listen on, from ``llamacpp_url``."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError(f"llamacpp_url must be an http:// URL to supervise llama-server, "
                          f"not {url!r}")
    return parts.hostname, parts.port or 80


def plan_for(entry: ModelEntry, settings: Settings, gpu: GPUProbe) -> OffloadPlan:
    """The offload plan for llama-server's -ngl and slots. Its own build decides what a GPU
    can do, so any GPU NVML sees counts as usable."""
    assert entry.info is not None
    snap = gpu.snapshot()
    return plan_for_settings(entry.info, settings, snap, offload_supported=snap.available,
                             n_slots=settings.parallel)


class LlamaServerSupervisor:
    def __init__(self, settings: Settings, registry: Registry, gpu: GPUProbe) -> None:
        if settings.llama_server_bin is None:
            raise ConfigError("llama_server_bin is not set")
        self.settings = settings
        self.registry = registry
        self.gpu = gpu
        self.binary = str(settings.llama_server_bin)
        self.host, self.port = loopback_port(settings.llamacpp_url)
        self.log_path = settings.data_dir / "llama-server.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.args: list[str] = []
        self.plan: OffloadPlan | None = None
        self.model_id: str | None = None
        self.restarts = 0
        self.last_exit: int | None = None
        self.started_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._log: IO[bytes] | None = None

    async def start(self) -> None:
        if not os.access(self.binary, os.X_OK):
            raise ConfigError(f"llama_server_bin {self.binary} is not an executable file")
        default = self.registry.default_id()
        entry = self.registry.get(default) if default else None
        if entry is None or not entry.usable or entry.info is None:
            raise ConfigError("llama-server cannot be started: the registry has no usable "
                              "default model")
        self.model_id = entry.id
        self.plan = plan_for(entry, self.settings, self.gpu)
        self.args = engine_args(self.binary, entry, self.plan, self.settings,
                                self.host, self.port)
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            if self.log_path.stat().st_size > LOG_KEEP:  # keep one previous log, not all
                self.log_path.replace(self.log_path.with_suffix(".log.1"))
        self._log = self.log_path.open("ab")
        log.info("starting llama-server for %s with -ngl %d (%s); log: %s", entry.id,
                 self.plan.n_gpu_layers, self.plan.reason, self.log_path)
        await self._spawn()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _spawn(self) -> None:
        # The key goes in the environment (llama-server reads LLAMA_API_KEY), not the
        # process list that every user can read.
        key = self.settings.llamacpp_api_key
        env = {**os.environ, "LLAMA_API_KEY": key} if key else None
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, stdin=asyncio.subprocess.DEVNULL, stdout=self._log,
            stderr=asyncio.subprocess.STDOUT, preexec_fn=die_with_parent, env=env)
        self.started_at = time.monotonic()
        log.info("llama-server started (pid %d) on %s:%d", self.proc.pid, self.host, self.port)

    async def _watch(self) -> None:
        backoff = MIN_BACKOFF
        while not self._stopping:
            assert self.proc is not None and self.started_at is not None
            code = await self.proc.wait()
            if self._stopping:
                return
            self.last_exit = code
            ran = time.monotonic() - self.started_at
            if ran >= STABLE_AFTER:
                backoff = MIN_BACKOFF
            log.warning("llama-server (pid %d) exited with %s after %.0fs; restarting in %.0fs "
                        "(see %s)", self.proc.pid, code, ran, backoff, self.log_path)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
            if self._stopping:
                return
            try:
                await self._spawn()
                self.restarts += 1
            except OSError as exc:
                log.error("could not restart llama-server: %s", exc)
                self.started_at = time.monotonic()

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._log is not None:
            self._log.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def describe(self) -> str:
        if self.running:
            assert self.proc is not None
            return f"supervised llama-server pid {self.proc.pid} is starting"
        return (f"supervised llama-server exited ({self.last_exit}) and is being restarted; "
                f"see {self.log_path}")

    def status(self) -> dict[str, Any]:
        return {
            "binary": self.binary,
            "pid": self.proc.pid if self.running and self.proc is not None else None,
            "running": self.running,
            "model": self.model_id,
            "args": self.args,
            "restarts": self.restarts,
            "last_exit_code": self.last_exit,
            "log": str(self.log_path),
            "plan": self.plan.to_dict() if self.plan is not None else None,
        }
