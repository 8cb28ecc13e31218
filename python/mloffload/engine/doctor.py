"""Can this machine run its llama.cpp? One token and one embedding, in a fresh process.

A native fault (an illegal instruction in ggml's CPU kernels, an abort) kills the process
that hits it, so the check runs in a child: the caller survives and can say what happened
in one line, with the likely cause and the command that fixes it. ``./dev`` runs it right
after set-up, the server before it serves, ``python -m mloffload doctor`` on demand and
``:checkhealth ml-offload`` for the plugin's fallback.

Results are cached per build: the key covers the engine's files (the ``llama_cpp``
package and its shared libraries, or the ``llama-server`` binary and the libraries beside
it), the CPU and the model, so a rebuilt engine or another CPU is checked again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import build

TIMEOUT = 180.0  # seconds for a whole check: loading a 253 MB model takes about one
INPROCESS = "llama.cpp in-process"
LLAMA_SERVER = "llama-server"

_SIGNALS = {
    signal.SIGILL: "illegal instruction",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGABRT: "abort",
    signal.SIGBUS: "bus error",
    signal.SIGFPE: "arithmetic fault",
    signal.SIGKILL: "killed",
}

# Runs in the child: the server's own engine code, on the given model. Stage markers on
# stderr say how far it got when a signal ends it.
_CHILD = r"""
import json, sys, threading
def stage(name):
    print("stage:" + name, file=sys.stderr, flush=True)
stage("import")
from mloffload.engine.base import GenerationResult, SamplingParams
from mloffload.engine.llamacpp import LlamaCppEngine, LoadOptions, engine_facts
from mloffload.models.gguf_info import read_gguf_info
facts = engine_facts()
if not facts.get("available"):
    print(facts.get("reason"), file=sys.stderr); sys.exit(3)
stage("load")
engine = LlamaCppEngine("smoke", read_gguf_info(sys.argv[1]), LoadOptions(n_ctx=256, n_threads=1))
stage("generate")
result = GenerationResult()
text = "".join(engine.complete("Hello", SamplingParams(max_tokens=1, temperature=0.0), result,
                               threading.Event()))
stage("embed")
vectors = engine.embed(["Hello world"]).vectors
engine.close()
print(json.dumps({"tokens": result.completion_tokens, "finish": result.finish_reason,
                  "dims": len(vectors[0]), "system_info": facts.get("system_info", "")}))
"""


@dataclasses.dataclass(frozen=True)
class Check:
    engine: str  # INPROCESS or LLAMA_SERVER
    ok: bool
    line: str  # one line for a person: what happened, the likely cause, the fix
    detail: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def rebuild_command() -> str:
    """The exact command that rebuilds llama.cpp for this CPU."""
    if (build.REPO / "dev").is_file() and (build.REPO / "pyproject.toml").is_file():
        return f"cd {build.REPO} && ./dev rebuild"
    flags = " ".join(build.NO_AMX)
    return (f"CMAKE_ARGS=\"-DCMAKE_C_FLAGS='{flags}' -DCMAKE_CXX_FLAGS='{flags}'\" pip install "
            f"--no-cache-dir --force-reinstall --no-deps "
            f"llama-cpp-python=={build.pinned_version()}")


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
        except ValueError:
            return f"signal {-returncode}"
        what = _SIGNALS.get(sig)
        return f"{sig.name} ({what})" if what else sig.name
    return f"exit status {returncode}"


def failure_line(engine: str, returncode: int | None, stage: str, said: str) -> str:
    """One line: what failed, the likely cause, the command that rebuilds it differently."""
    fix = f"rebuild it for this CPU: {rebuild_command()}"
    where = {"load": "loading a model", "generate": "generating a token",
             "embed": "computing an embedding", "import": "starting"}.get(stage, stage)
    if returncode is None:
        return (f"{engine} did not finish its smoke test in {TIMEOUT:.0f}s (while {where}); "
                f"the machine may be overloaded, or the build hangs; {fix}")
    if returncode == -signal.SIGILL:
        return (f"{engine} died with SIGILL (illegal instruction) in its CPU kernels while "
                f"{where}: it was built for instructions this CPU cannot run (ggml's AMX "
                f"kernels on Intel Xeon with AMX, or a build made on another CPU); {fix}")
    if returncode < 0:
        return (f"{engine} died with {describe_exit(returncode)} while {where}: the native "
                f"llama.cpp build is broken on this machine; {fix}")
    tail = said.strip().splitlines()[-1][:300] if said.strip() else "no output"
    return (f"{engine} failed its smoke test ({describe_exit(returncode)}) while {where}: "
            f"{tail}; {fix}")


# --- cache ---------------------------------------------------------------------------


def _stat(path: Path) -> list[Any]:
    try:
        st = path.stat()
        return [str(path), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(path), None, None]


def _key(kind: str, files: Sequence[Path], model: Path) -> str:
    data = [kind, [_stat(p) for p in files], _stat(model), build.cpu_signature(),
            sys.executable]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:20]


def _cache_file(key: str) -> Path:
    return build.cache_root() / "checks" / f"{key}.json"


def _cached(key: str) -> Check | None:
    try:
        data = json.loads(_cache_file(key).read_text())
        return Check(data["engine"], bool(data["ok"]), str(data["line"]), dict(data["detail"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remember(key: str, check: Check) -> None:
    path = _cache_file(key)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(check.to_dict()))
        tmp.replace(path)


# --- in-process llama.cpp ------------------------------------------------------------


def inprocess_files() -> list[Path]:
    """The llama_cpp package this Python would import, and its shared libraries."""
    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return []
    origin = Path(spec.origin)
    libs = sorted((origin.parent / "lib").glob("*.so*")) if (origin.parent / "lib").is_dir() \
        else []
    return [origin, *libs]


def _package_path() -> str:
    """So the child imports this very mloffload, installed or not."""
    return str(Path(__file__).resolve().parents[2])


def check_inprocess(model: Path, use_cache: bool = True) -> Check:
    files = inprocess_files()
    if not files:
        return Check(INPROCESS, False, "llama-cpp-python is not installed in this Python "
                     f"({sys.executable}); {rebuild_command()}", {})
    key = _key("inprocess", files, model)
    if use_cache and (hit := _cached(key)) is not None:
        return hit
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), _package_path()) if p)
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(model)], env=env,
                              capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        stage = _last_stage(exc.stderr if isinstance(exc.stderr, str) else "")
        check = Check(INPROCESS, False, failure_line(INPROCESS, None, stage, ""), {})
        _remember(key, check)
        return check
    except OSError as exc:  # this Python cannot even be started again (not remembered)
        return Check(INPROCESS, False, f"{INPROCESS}: cannot start {sys.executable} for the "
                     f"engine check: {exc.strerror or exc}", {})
    seconds = round(time.monotonic() - started, 2)
    stage = _last_stage(proc.stderr)
    if proc.returncode != 0:
        said = "\n".join(ln for ln in proc.stderr.splitlines() if not ln.startswith("stage:"))
        detail = {"returncode": proc.returncode, "stage": stage, "stderr": said[-2000:],
                  "seconds": seconds}
        check = Check(INPROCESS, False, failure_line(INPROCESS, proc.returncode, stage, said),
                      detail)
    else:
        try:
            out = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out = {}
        if not out.get("dims") or out.get("tokens") is None:
            check = Check(INPROCESS, False, failure_line(INPROCESS, 1, stage,
                                                         f"unexpected answer {proc.stdout!r}"),
                          {"stdout": proc.stdout[-2000:]})
        else:
            check = Check(INPROCESS, True, f"{INPROCESS}: generated a token and a "
                          f"{out['dims']}-dimension embedding in {seconds:.1f}s",
                          {**out, "seconds": seconds})
    _remember(key, check)
    return check


def _last_stage(stderr: str) -> str:
    stages = [ln[len("stage:"):] for ln in stderr.splitlines() if ln.startswith("stage:")]
    return stages[-1] if stages else "import"


# --- llama-server ----------------------------------------------------------------------


def server_files(binary: Path) -> list[Path]:
    libs = sorted(binary.parent.glob("*.so*"))
    return [binary, *libs]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(port: int, path: str, body: dict[str, Any], timeout: float) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, data.decode("utf-8", "replace")


def _get_status(port: int, path: str) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return None
    finally:
        conn.close()


def check_llama_server(binary: Path, model: Path, use_cache: bool = True) -> Check:
    if not os.access(binary, os.X_OK):
        return Check(LLAMA_SERVER, False, f"llama-server {binary} is not an executable file; "
                     f"build it: {rebuild_command()}", {})
    key = _key("llama-server", server_files(binary), model)
    if use_cache and (hit := _cached(key)) is not None:
        return hit
    port = _free_port()
    started = time.monotonic()
    stage = "load"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
             "-c", "256", "-t", "1", "-np", "1", "--embeddings", "--pooling", "mean",
             "--no-webui"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        returncode: int | None = None
        out: dict[str, Any] = {}
        try:
            deadline = started + TIMEOUT
            while _get_status(port, "/health") != 200:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError
                time.sleep(0.1)
            stage = "generate"
            status, data = _post(port, "/completion", {"prompt": "Hello", "n_predict": 1,
                                                       "temperature": 0}, 60)
            if status != 200 or not isinstance(data, dict):
                raise RuntimeError(f"/completion answered {status}: {data}")
            out["tokens"] = data.get("tokens_predicted")
            stage = "embed"
            status, data = _post(port, "/v1/embeddings", {"input": "Hello world"}, 60)
            if status != 200 or not isinstance(data, dict):
                raise RuntimeError(f"/v1/embeddings answered {status}: {data}")
            out["dims"] = len(data["data"][0]["embedding"])
        except (RuntimeError, OSError, KeyError, IndexError, TypeError) as exc:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(2)
            returncode = proc.poll()
            if returncode is None and time.monotonic() <= started + TIMEOUT:
                returncode = 1  # alive but answered wrongly
            log.seek(0)
            said = log.read().decode("utf-8", "replace")
            if str(exc):
                said += "\n" + str(exc)
            line = failure_line(LLAMA_SERVER, returncode, stage, said)
            check = Check(LLAMA_SERVER, False, line, {"returncode": returncode, "stage": stage,
                                                      "log": said[-2000:]})
        else:
            seconds = round(time.monotonic() - started, 2)
            check = Check(LLAMA_SERVER, True, f"{LLAMA_SERVER}: generated a token and a "
                          f"{out['dims']}-dimension embedding in {seconds:.1f}s",
                          {**out, "seconds": seconds, "binary": str(binary)})
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    _remember(key, check)
    return check


# --- what a machine has -------------------------------------------------------------


def smoke_model(data_dir: Path) -> Path:
    """The embedded Gemma 3 270M: small, always installed, and what the checks load."""
    from ..models.catalog import ensure_embedded_model

    return ensure_embedded_model(data_dir)


def check_engines(settings: Any, use_cache: bool = True, model: Path | None = None
                  ) -> list[Check]:
    """Every engine this machine would use: in-process llama.cpp, and llama-server when a
    binary is at hand."""
    model = model or smoke_model(settings.data_dir)
    checks = [check_inprocess(model, use_cache)]
    binary, _ = build.find_llama_server(settings.llama_server_bin)
    if binary is not None:
        checks.append(check_llama_server(binary, model, use_cache))
    return checks
