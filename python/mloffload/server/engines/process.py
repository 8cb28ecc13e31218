"""One model in its own llama-server child process: start it, watch it, stop it.

The child listens on a private loopback port with a key of its own (handed over in its
environment, never on the command line), dies with us (``PR_SET_PDEATHSIG``, even when we
are SIGKILLed), and writes its log to ``<data_dir>/engines/<model>.log`` (one previous log
kept). When it exits by itself, whoever started it hears why: the signal or exit status
and the last lines of its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ...config import Settings
from ...engine.base import EngineError
from ...engine.doctor import describe_exit
from ...hardware.planner import OffloadPlan
from ...models.registry import ModelEntry
from ..upstream.client import UpstreamClient

log = logging.getLogger("mloffload.engines")

LOG_KEEP = 16 * 1024**2
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
POLL = 0.05  # seconds between readiness checks while an engine starts


def die_with_parent() -> None:
    """In the child: get SIGTERM when the server dies, even by SIGKILL."""
    if sys.platform != "linux":
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def engine_args(binary: str, entry: ModelEntry, plan: OffloadPlan, settings: Settings,
                host: str, port: int, alias: str | None = None) -> list[str]:
    """llama-server's command line for ``entry`` as ``plan`` says: its -ngl, a context of
    n_ctx per slot, mean-pooled embeddings, our thread count, and our plan taken as it is
    (``--fit off``: llama-server would otherwise adjust unset parameters itself)."""
    slots = plan.n_slots
    args = [binary, "-m", entry.path, "--host", host, "--port", str(port),
            "-c", str(plan.n_ctx * slots), "--parallel", str(slots),
            "-ngl", str(plan.n_gpu_layers), "-t", str(settings.effective_threads),
            "--embeddings", "--pooling", "mean", "--metrics", "--fit", "off", "--no-webui"]
    if alias:
        args += ["--alias", alias]
    if plan.n_gpu_layers > 0:
        args += ["--main-gpu", str(settings.gpu)]
    info = entry.info
    if info is not None and not info.has_chat_template and \
            (info.architecture or "").startswith("gemma"):
        # The embedded Gemma 3 base model ships no template; llama-server would use ChatML.
        # With Jinja on (its default) the name would be read as a template's literal text.
        args += ["--no-jinja", "--chat-template", "gemma"]
    return args


def open_log(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        if path.stat().st_size > LOG_KEEP:  # keep one previous log, not all
            path.replace(path.with_suffix(".log.1"))
    return path.open("ab")


def log_tail(path: Path, lines: int = 8, limit: int = 1200) -> str:
    """The last lines of an engine's log, for an error message."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    tail = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(tail)[-limit:]


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class EngineProcess:
    """A llama-server for one model, its client, and what happened to it."""

    def __init__(self, binary: str, entry: ModelEntry, plan: OffloadPlan, settings: Settings,
                 on_exit: Callable[[str], None]) -> None:
        self.binary = binary
        self.entry = entry
        self.plan = plan
        self.settings = settings
        self.on_exit = on_exit
        self.log_path = settings.data_dir / "engines" / f"{entry.id}.log"
        self.host = "127.0.0.1"
        self.port = 0
        self.key = secrets.token_urlsafe(24)
        self.proc: asyncio.subprocess.Process | None = None
        self.args: list[str] = []
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.exit_reason: str | None = None  # why it ended, once it has
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None
        self._exited = asyncio.Event()
        self.client: UpstreamClient | None = None
        self.embed_lock = asyncio.Lock()  # one embedding request at a time (see backend)

    @property
    def slots(self) -> int:
        return self.plan.n_slots

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    # --- start ----------------------------------------------------------------------------

    async def start(self, timeout: float) -> None:
        """Start it and wait until it answers ``/health`` with 200; EngineError if it exits
        first or is not ready within ``timeout`` (then it is killed)."""
        self.port = free_port(self.host)
        self.args = engine_args(self.binary, self.entry, self.plan, self.settings, self.host,
                                self.port, alias=self.entry.id)
        label = f"the engine of {self.entry.id} (llama-server pid {{pid}}, port {self.port})"
        logfile = open_log(self.log_path)
        try:
            logfile.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} "
                          f"{' '.join(self.args)}\n".encode())
            logfile.flush()
            self.proc = await asyncio.create_subprocess_exec(
                *self.args, stdin=asyncio.subprocess.DEVNULL, stdout=logfile,
                stderr=asyncio.subprocess.STDOUT, preexec_fn=die_with_parent,
                env={**os.environ, "LLAMA_API_KEY": self.key})
        except OSError as exc:
            raise EngineError(f"llama-server {self.binary} could not be started: {exc}") \
                from None
        finally:
            logfile.close()
        self.started_at = time.monotonic()
        self.client = UpstreamClient(
            f"http://{self.host}:{self.port}", self.key, label=label.format(pid=self.proc.pid),
            request_timeout=self.settings.request_timeout,
            pool_timeout=self.settings.load_timeout)
        self.client.start()
        self._watch = asyncio.get_running_loop().create_task(self._wait_exit())
        log.info("engine for %s: llama-server pid %d on port %d (%d slots, -ngl %d); log %s",
                 self.entry.id, self.proc.pid, self.port, self.slots, self.plan.n_gpu_layers,
                 self.log_path)
        try:
            await self._wait_ready(timeout)
        except BaseException:
            await self.stop()
            raise
        self.ready_at = time.monotonic()

    async def _wait_ready(self, timeout: float) -> None:
        assert self.client is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._exited.is_set():
                raise EngineError(f"llama-server exited before it was ready: "
                                  f"{self.exit_reason}")
            with contextlib.suppress(Exception):
                status, _ = await self.client.get_status("/health", timeout=2.0)
                if status == 200:
                    return
            if time.monotonic() > deadline:
                tail = log_tail(self.log_path)
                raise EngineError(f"llama-server was not ready after {timeout:g}s and was "
                                  f"stopped (load_timeout){'; its log: ' + tail if tail else ''}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exited.wait(), POLL)

    async def _wait_exit(self) -> None:
        assert self.proc is not None
        code = await self.proc.wait()
        tail = log_tail(self.log_path)
        self.exit_reason = f"{describe_exit(code)}" + (f"; its log ends: {tail}" if tail else "")
        self._exited.set()
        if not self._stopping:
            self.on_exit(self.exit_reason)

    # --- stop -----------------------------------------------------------------------------

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; returns once it has been reaped."""
        self._stopping = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._watch is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self.client is not None:
            await self.client.close()

    async def close(self) -> None:
        """The Runner protocol's close: the process has exited when this returns."""
        await self.stop()

    async def died(self, within: float = 1.0) -> str | None:
        """Why it died, if it has (or does within ``within`` seconds: a connection breaks a
        moment before the kernel reports the exit)."""
        if not self._exited.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exited.wait(), within)
        return self.exit_reason if self._exited.is_set() else None

    # --- facts ----------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "engine": {
                "kind": "llama-server",
                "pid": self.pid if self.alive else None,
                "port": self.port,
                "alive": self.alive,
                "rss_bytes": rss_bytes(self.proc.pid) if self.alive and self.proc else None,
                "uptime_seconds": round(now - self.started_at, 1) if self.started_at else None,
                "start_seconds": round(self.ready_at - self.started_at, 3)
                if self.ready_at and self.started_at else None,
                "log": str(self.log_path),
                "exit": self.exit_reason,
            },
        }
