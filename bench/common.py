"""Helpers shared by the benchmarks in ``bench/``: machine facts, free ports, server
subprocesses, a streaming client that timestamps every SSE event, statistics, and writing
results as JSON and Markdown.

Nothing here imports the project or llama-cpp-python, so any benchmark can use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


# --- machine facts ----------------------------------------------------------------------


def _cpuinfo() -> dict[str, Any]:
    model, logical, physical = "unknown", 0, set()
    phys_id = core_id = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": platform.processor() or "unknown", "logical_cpus": os.cpu_count()}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "processor":
            logical += 1
        elif key == "model name" and model == "unknown":
            model = value
        elif key == "physical id":
            phys_id = value
        elif key == "core id":
            core_id = value
            physical.add((phys_id, core_id))
    flags = ""
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = line.partition(":")[2]
            break
    simd = [f for f in ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni")
            if f" {f} " in f" {flags} "]
    return {"model": model, "logical_cpus": logical, "physical_cores": len(physical) or None,
            "simd": simd}


def _meminfo_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip() + ("+dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    """CPU, memory, OS, Python and load: what a reader needs to judge the numbers."""
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": _cpuinfo(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "memory_gib": _meminfo_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "loadavg_at_start": load,
        "hostname": platform.node(),
    }


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()


def command_line(argv: Sequence[str] | None = None) -> str:
    return shlex.join([Path(sys.executable).name, *(sys.argv if argv is None else argv)])


# --- processes ---------------------------------------------------------------------------


def parse_shared_args(parser: argparse.ArgumentParser, argv: Sequence[str],
                      name: str) -> argparse.Namespace:
    """bench/run.py hands the same options to every benchmark: each skips the others'."""
    args, unknown = parser.parse_known_args(list(argv))
    if unknown:
        print(f"bench/{name}.py: ignoring {' '.join(unknown)}", file=sys.stderr)
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ManagedProcess:
    """A server in a subprocess: output to a log file, readiness by polling a URL.

    ``env`` is laid over this process's environment; a value of None removes a variable.
    """

    def __init__(self, name: str, cmd: Sequence[str], *, url: str, log_dir: Path,
                 env: Mapping[str, str | None] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.url = url
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("w")
        full_env = dict(os.environ)
        for key, value in (env or {}).items():  # None removes an inherited variable
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        self.proc = subprocess.Popen(self.cmd, env=full_env, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=str(cwd or REPO))

    def wait_ready(self, path: str, timeout: float = 180.0) -> float:
        """Poll ``path`` until it answers 200; return the seconds it took."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready in {timeout:g}s; log {self.log_path}:\n"
                           f"{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        self._log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the process so far (None without psutil)."""
        try:
            import psutil  # type: ignore[import-untyped,unused-ignore]
        except ImportError:
            return None
        try:
            t = psutil.Process(self.proc.pid).cpu_times()
        except psutil.Error:
            return None
        return float(t.user + t.system)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


# --- timing client -----------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    """One request as the client saw it. Times are seconds from just before the send."""

    ok: bool
    status: int = 0
    error: str = ""
    total: float = 0.0  # until the response (or the stream) ended
    first_content: float | None = None  # first event carrying non-empty text
    last_content: float | None = None
    content_events: int = 0
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None  # from the server's usage, when it gave one
    cpu_seconds: float | None = None  # the serving process's CPU time for this request

    def add_text(self, t: float, text: str) -> None:
        """An event carrying ``text`` arrived ``t`` seconds after the send."""
        self.text += text
        self.content_events += 1
        if self.first_content is None:
            self.first_content = t
        self.last_content = t

    def tokens(self, max_tokens: int) -> tuple[int, str]:
        """Generated tokens and how they were counted: the server's usage, else
        max_tokens when it stopped for length, else one token per content event."""
        if self.completion_tokens is not None:
            return self.completion_tokens, "usage"
        if self.finish_reason == "length":
            return max_tokens, "finish_reason=length"
        return self.content_events, "events"

    def decode_tps(self, max_tokens: int) -> float | None:
        """Tokens per second between the first and the last content event (streams)."""
        n, _ = self.tokens(max_tokens)
        if self.first_content is None or self.last_content is None or n < 2:
            return None
        span = self.last_content - self.first_content
        return (n - 1) / span if span > 0 else None

    def e2e_tps(self, max_tokens: int) -> float | None:
        n, _ = self.tokens(max_tokens)
        return n / self.total if self.total > 0 and n else None


def _choice_text(choice: Mapping[str, Any]) -> str:
    delta = choice.get("delta")
    if isinstance(delta, Mapping):
        return str(delta.get("content") or "")
    message = choice.get("message")
    if isinstance(message, Mapping):
        return str(message.get("content") or "")
    return str(choice.get("text") or "")


def _absorb(sample: Sample, data: Mapping[str, Any]) -> str:
    usage = data.get("usage")
    if isinstance(usage, Mapping):
        sample.prompt_tokens = usage.get("prompt_tokens", sample.prompt_tokens)
        sample.completion_tokens = usage.get("completion_tokens", sample.completion_tokens)
    text = ""
    for choice in data.get("choices") or ():
        text += _choice_text(choice)
        if choice.get("finish_reason"):
            sample.finish_reason = choice["finish_reason"]
    return text


def timed_stream(client: httpx.Client, url: str, body: Mapping[str, Any]) -> Sample:
    """POST a streaming request and timestamp every SSE event as its bytes arrive.

    Events are parsed only after the stream has ended, so the client does as little as
    possible while the server is generating.
    """
    arrivals: list[tuple[float, bytes]] = []
    t0 = time.perf_counter()
    try:
        with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                r.read()
                return Sample(ok=False, status=r.status_code, error=r.text[:500],
                              total=time.perf_counter() - t0)
            buf = b""
            for chunk in r.iter_raw():
                t = time.perf_counter() - t0
                # sse-starlette separates lines with \r\n; a lone \r waits for its \n.
                buf = (buf + chunk).replace(b"\r\n", b"\n")
                while (cut := buf.find(b"\n\n")) >= 0:
                    arrivals.append((t, buf[:cut]))
                    buf = buf[cut + 2:]
            total = time.perf_counter() - t0
            status = r.status_code
    except httpx.HTTPError as exc:
        return Sample(ok=False, error=repr(exc), total=time.perf_counter() - t0)
    sample = Sample(ok=True, status=status, total=total)
    for t, raw in arrivals:
        for line in raw.split(b"\n"):
            if not line.startswith(b"data:"):
                continue  # comments (": ping"), event names
            payload = line[5:].strip()
            if payload == b"[DONE]":
                continue
            try:
                data = json.loads(payload)
            except ValueError:
                sample.ok, sample.error = False, f"bad SSE payload: {payload[:200]!r}"
                continue
            if "error" in data:
                sample.ok, sample.error = False, json.dumps(data["error"])[:500]
                continue
            text = _absorb(sample, data)
            if text:
                sample.add_text(t, text)
    return sample


def timed_request(client: httpx.Client, url: str, body: Mapping[str, Any]) -> Sample:
    """POST a non-streaming request; the whole answer counts as one event."""
    t0 = time.perf_counter()
    try:
        r = client.post(url, json=body)
        total = time.perf_counter() - t0
    except httpx.HTTPError as exc:
        return Sample(ok=False, error=repr(exc), total=time.perf_counter() - t0)
    if r.status_code != 200:
        return Sample(ok=False, status=r.status_code, error=r.text[:500], total=total)
    sample = Sample(ok=True, status=200, total=total)
    sample.text = _absorb(sample, r.json())
    sample.first_content = sample.last_content = total
    sample.content_events = 1 if sample.text else 0
    return sample


# --- statistics ----------------------------------------------------------------------------


def median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def percentile(values: Sequence[float | None], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    if len(vals) == 1:
        return vals[0]
    pos = (len(vals) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# --- output ----------------------------------------------------------------------------------


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
             align: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table; ``align`` holds 'l' or 'r' per column (default: 'l')."""
    marks = [("---:" if a == "r" else "---") for a in (align or ["l"] * len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
