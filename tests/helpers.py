"""Test helpers: real server processes on free ports, and small HTTP/SSE utilities."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float = 60.0, interval: float = 0.05,
             what: str = "condition", details: Callable[[], str] | None = None) -> T:
    """Poll until ``check()`` returns something truthy, and return it; after ``timeout``
    seconds fail, naming ``what`` (and ``details()``, e.g. a log)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{details()}" if details is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, as a service manager would; SIGKILL if it is still there after ``grace``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class ServerProcess:
    """``python -m mloffload.server`` in a subprocess, on a free port, logs in a file."""

    def __init__(self, data_dir: Path, args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, port: int | None = None,
                 module: str = "mloffload.server") -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / f"server-{self.port}.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("ML_OFFLOAD_")}
        # In-process llama.cpp unless a test names another backend (managed mode, the
        # default where a llama-server binary exists, has tests of its own).
        full_env.update({"ML_OFFLOAD_DATA_DIR": str(data_dir), "ML_OFFLOAD_PORT": str(self.port),
                         "ML_OFFLOAD_BACKEND": "llamacpp", "PYTHONUNBUFFERED": "1"})
        full_env.update(env or {})
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=full_env, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(REPO),
        )

    def wait_ready(self, timeout: float = 120.0, path: str = "/health",
                   headers: Mapping[str, str] | None = None) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=2, headers=headers).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 30.0) -> str:
        """The log once ``text`` is in it: an access line is written after the answer."""
        wait_for(lambda: text in self.log(), timeout, what=f"{text!r} in the server log",
                 details=self.log)
        return self.log()

    def rss(self) -> int:
        import psutil

        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def stop(self) -> None:
        stop_process(self.proc, grace=15)
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sse_events(response: httpx.Response) -> Iterator[Any]:
    """Parse an SSE body into JSON objects; the literal [DONE] comes back as the string."""
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        payload = line[len("data: "):]
        yield payload if payload == "[DONE]" else json.loads(payload)


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None,
                        type_: str | None = None, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) >= {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert "Traceback" not in err["message"]
    if code is not None:
        assert err["code"] == code, err
    if type_ is not None:
        assert err["type"] == type_, err
    if param is not None:
        assert err["param"] == param, err
    return dict(err)


def machine_gpu() -> tuple[bool, str]:
    """(whether llama.cpp here can offload to a GPU NVML sees, why not). Tests that look at
    GPU numbers check this machine's truth: "no GPU, and the reason" without one, the
    GPU's real numbers with one."""
    from mloffload.engine.llamacpp import engine_facts
    from mloffload.hardware.gpu import GPUProbe

    snap = GPUProbe().snapshot()
    if not snap.available:
        return False, snap.reason
    if not engine_facts().get("supports_gpu_offload"):
        return False, "this llama.cpp build cannot offload"
    return True, ""


def model_folder(folder: Path, model_path: Path, ids: Sequence[str]) -> Path:
    """``folder`` with hard links to the real model under ``ids`` and ``alien.gguf``: the
    same file with an architecture llama.cpp does not know (its header still reads)."""
    for name in ids:
        os.link(model_path, folder / f"{name}.gguf")
    data = bytearray(model_path.read_bytes()[:4_000_000])
    i = data.index(b"gemma3")  # general.architecture's value comes first
    data[i:i + 6] = b"gemmaX"
    with (folder / "alien.gguf").open("wb") as out, model_path.open("rb") as src:
        out.write(data)
        src.seek(len(data))
        out.write(src.read())
    return folder
