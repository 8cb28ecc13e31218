"""A real llama.cpp ``llama-server`` for tests and benchmarks: built once, started on a port.

The binary comes from ``ML_OFFLOAD_LLAMA_SERVER_BIN`` (``./dev test`` exports it) or from
``python/mloffload/engine/build.py``, which builds it into ~/.cache/ml-offload the first
time (about five minutes on two cores), so a fresh CI machine runs these tests too.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

from helpers import stop_process

REPO = Path(__file__).resolve().parent.parent


@functools.cache
def llama_server_bin() -> Path:
    env = os.environ.get("ML_OFFLOAD_LLAMA_SERVER_BIN")
    if env and os.access(env, os.X_OK):
        return Path(env)
    out = subprocess.run(
        [sys.executable, str(REPO / "python" / "mloffload" / "engine" / "build.py"),
         "llama-server"], stdout=subprocess.PIPE, text=True, check=True, timeout=3600)
    return Path(out.stdout.strip().splitlines()[-1])


class LlamaServer:
    """``llama-server -m MODEL --port PORT`` in a subprocess; stop, kill and start it again."""

    def __init__(self, model: Path, log_dir: Path, port: int,
                 args: Sequence[str] = (), n_ctx: int = 2048) -> None:
        self.model = model
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.args = [str(llama_server_bin()), "-m", str(model), "--host", "127.0.0.1",
                     "--port", str(port), "-c", str(n_ctx), "--metrics", *args]
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"llama-server-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LlamaServer:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        return self

    def wait_ready(self, timeout: float = 240.0) -> LlamaServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"llama-server not ready in {timeout}s:\n{self.log()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure_running(self) -> LlamaServer:
        if not self.running:
            self.start()
        return self.wait_ready()

    def stop(self) -> None:
        """A clean stop (SIGTERM), as a service manager would."""
        if self.proc is not None:
            stop_process(self.proc, grace=30)

    def kill(self) -> None:
        """A crash (SIGKILL): connections drop with no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def metrics(self) -> dict[str, float]:
        """llama-server's own Prometheus counters (it runs with --metrics)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name.removeprefix("llamacpp:")] = float(value)
        return out

    def decoding(self) -> int:
        """Tokens generated so far by the request a slot is working on (0 when idle)."""
        slots = httpx.get(self.url + "/slots", timeout=10).json()
        return max((s.get("next_token", [{}])[0].get("n_decoded", 0) for s in slots
                    if s.get("is_processing")), default=0)

    def wait_idle(self, timeout: float = 180.0, every: float = 2.0) -> dict[str, float]:
        """Poll until no request is being processed; return the metrics then.

        Polls slowly on purpose: llama-server checks whether the client of a non-streamed
        request is still there only after a full second in which no task (a /metrics or
        /slots poll included) produced a result.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.metrics()
            if m["requests_processing"] == 0 and m.get("requests_deferred", 0) == 0:
                return m
            time.sleep(every)
        raise TimeoutError("llama-server still busy")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running(model: Path, log_dir: Path, port: int, args: Sequence[str] = ()
            ) -> Iterator[LlamaServer]:
    """A started, ready llama-server, stopped at the end."""
    with LlamaServer(model, log_dir, port, args) as server:
        yield server.start().wait_ready()


def proxy_env(url: str) -> dict[str, str]:
    """The environment that puts our server in front of the llama-server at ``url``."""
    return {"ML_OFFLOAD_BACKEND": "llama-server", "ML_OFFLOAD_LLAMACPP_URL": url}
