"""The GPU check's driver (issues 3, 12, 13); ``bench/gpu_check.sh`` sets up its environment.

On a lent H100/H200 it smoke-tests the CUDA build (``mloffload doctor``), starts our server
with ``n_gpu_layers=auto`` — in-process, and in managed mode when a CUDA ``llama-server`` is
given (``--llama-server-bin``) — and prints: the offload plan (and, managed, the layers
llama-server's own ``--fit`` picks for the same model and context), VRAM (our ``/vram``,
per engine process, and nvidia-smi) before load / after load / during generation / after
unload / after a ``keep_alive: 0`` request, and decode tokens/s on the GPU vs the CPU (a
second server with ``ML_OFFLOAD_N_GPU_LAYERS=0``) vs raw llama-cpp-python on the GPU in a
separate process, and against the memory-bandwidth bound (weight bytes read per token ÷ the
device-to-device copy bandwidth measured in the same call, when PyTorch is there). After an
unload, VRAM must be back at its baseline within 64 MiB. Without a GPU the same flow runs
on the CPU (the plan says 0 layers, ``/vram`` says unavailable), which is how it is tested.

Results: printed, and written to ``<out>/gpu_check.json`` and ``<out>/gpu_check.md`` with
the servers' logs beside them (``--out``, default ``$OUT`` or ``/tmp/gpu-check``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
    ManagedProcess,
    fmt,
    free_port,
    machine_info,
    md_table,
    median,
    now_iso,
    timed_request,
    timed_stream,
    write_json,
)

PROMPT = "Once upon a time"
MiB = 1024**2


def log(msg: str) -> None:
    print(msg, flush=True)


# --- GPU memory from both sides -----------------------------------------------------------


def nvidia_smi() -> dict[str, Any]:
    """Per-GPU memory (MiB) and the compute processes, straight from nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"available": False, "reason": "nvidia-smi not found"}
    try:
        gpus = subprocess.run(
            [exe, "--query-gpu=index,name,memory.total,memory.used,memory.free,"
             "utilization.gpu", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True).stdout
        apps = subprocess.run(
            [exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return {"available": False, "reason": f"nvidia-smi failed: {exc}"}
    rows = []
    for line in gpus.strip().splitlines():
        f = [x.strip() for x in line.split(",")]
        if len(f) >= 6:
            rows.append({"index": int(f[0]), "name": f[1], "total_mib": _num(f[2]),
                         "used_mib": _num(f[3]), "free_mib": _num(f[4]),
                         "util_percent": _num(f[5])})
    procs = []
    for line in apps.strip().splitlines():
        f = [x.strip() for x in line.split(",")]
        if len(f) >= 2:
            procs.append({"pid": _num(f[0]), "used_mib": _num(f[1])})
    return {"available": bool(rows), "gpus": rows, "processes": procs}


def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def vram(client: httpx.Client, url: str) -> dict[str, Any]:
    try:
        r = client.get(url + "/vram", timeout=10)
        data: dict[str, Any] = r.json()
        return data
    except (httpx.HTTPError, ValueError) as exc:
        return {"available": False, "reason": f"/vram failed: {exc}"}


def memory_point(label: str, client: httpx.Client | None, url: str | None,
                 pid: int | None) -> dict[str, Any]:
    smi = nvidia_smi()
    ours = vram(client, url) if client is not None and url else None
    point: dict[str, Any] = {"label": label, "t": time.time(), "nvidia_smi": smi, "vram": ours}
    point["smi_used_mib"] = smi["gpus"][0]["used_mib"] if smi.get("gpus") else None
    point["smi_process_mib"] = next((p["used_mib"] for p in smi.get("processes", [])
                                     if pid is not None and p["pid"] == pid), None)
    engines = (ours or {}).get("engines") or []
    point["engines"] = [{"pid": e.get("pid"), "model": e.get("model"),
                         "vram_mib": None if e.get("vram_bytes") is None
                         else e["vram_bytes"] / MiB,
                         "planned_mib": None if e.get("planned_gpu_bytes") is None
                         else e["planned_gpu_bytes"] / MiB} for e in engines]
    if ours and ours.get("available"):
        point["vram_used_mib"] = ours["used_bytes"] / MiB
        gpu0 = (ours.get("gpus") or [{}])[0]
        point["vram_ours_mib"] = next(
            ((p.get("used_bytes") or 0) / MiB for p in gpu0.get("processes", [])
             if p.get("ours")), None)
    else:
        point["vram_used_mib"] = point["vram_ours_mib"] = None
    log(f"  VRAM {label:<34} nvidia-smi used {fmt(point['smi_used_mib'], 0):>7} MiB"
        f" (our pid {fmt(point['smi_process_mib'], 0)}) | /vram used "
        f"{fmt(point['vram_used_mib'], 0):>7} MiB (ours {fmt(point['vram_ours_mib'], 0)})"
        + ("" if ours is None or ours.get("available") else f"  [/vram: {ours.get('reason')}]"))
    for e in point["engines"]:
        log(f"       engine pid {e['pid']} ({e['model']}): {fmt(e['vram_mib'], 0)} MiB by NVML, "
            f"{fmt(e['planned_mib'], 0)} MiB planned")
    return point


class Sampler(threading.Thread):
    """Polls nvidia-smi and /vram while a generation runs; keeps the peak."""

    def __init__(self, client: httpx.Client, url: str, pid: int) -> None:
        super().__init__(daemon=True)
        self.client, self.url, self.pid = client, url, pid
        self.stop = threading.Event()
        self.points: list[dict[str, Any]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            smi = nvidia_smi()
            ours = vram(self.client, self.url)
            self.points.append({
                "smi_used_mib": smi["gpus"][0]["used_mib"] if smi.get("gpus") else None,
                "vram_used_mib": ours["used_bytes"] / MiB if ours.get("available") else None,
                "util_percent": smi["gpus"][0]["util_percent"] if smi.get("gpus") else None,
            })
            self.stop.wait(0.25)

    def peak(self) -> dict[str, Any]:
        def top(key: str) -> float | None:
            vals = [p[key] for p in self.points if p[key] is not None]
            return max(vals) if vals else None

        return {"label": "during generation (peak)", "samples": len(self.points),
                "smi_used_mib": top("smi_used_mib"), "vram_used_mib": top("vram_used_mib"),
                "util_percent_peak": top("util_percent")}


# --- one server run -------------------------------------------------------------------------


def start_server(name: str, model: Path, args: argparse.Namespace, out: Path,
                 n_gpu_layers: str | None, backend: str = "llamacpp") -> ManagedProcess:
    port = free_port()
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("ML_OFFLOAD_")}
    env.update({
        "ML_OFFLOAD_DATA_DIR": str(args.work / f"data-{name}"),
        "ML_OFFLOAD_DEFAULT_MODEL": str(model),
        "ML_OFFLOAD_PORT": str(port),
        "ML_OFFLOAD_N_CTX": str(args.n_ctx),
        "ML_OFFLOAD_THREADS": str(args.threads),
        "ML_OFFLOAD_KEEP_ALIVE": "-1",
        "ML_OFFLOAD_BACKEND": backend,
        "PYTHONUNBUFFERED": "1",
    })
    if backend == "managed":
        env["ML_OFFLOAD_LLAMA_SERVER_BIN"] = str(args.llama_server_bin)
    if n_gpu_layers is not None:
        env["ML_OFFLOAD_N_GPU_LAYERS"] = n_gpu_layers
    return ManagedProcess(f"server-{name}", [sys.executable, "-m", "mloffload.server"],
                          url=f"http://127.0.0.1:{port}", log_dir=out, env=env)


def body(args: argparse.Namespace, stream: bool, max_tokens: int | None = None,
         **extra: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"model": "default", "prompt": args.prompt, "temperature": 0.0,
                         "seed": 42, "max_tokens": max_tokens or args.max_tokens,
                         "stream": stream, **extra}
    if stream:
        b["stream_options"] = {"include_usage": True}
    return b


def speed(client: httpx.Client, url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Streamed decode tokens/s and TTFT, and non-streamed end-to-end tokens/s (medians)."""
    streamed, plain = [], []
    timed_stream(client, url + "/v1/completions", body(args, True))  # warm-up
    for _ in range(args.reps):
        streamed.append(timed_stream(client, url + "/v1/completions", body(args, True)))
        plain.append(timed_request(client, url + "/v1/completions", body(args, False)))
    bad = [s.error for s in streamed + plain if not s.ok]
    return {
        "decode_tps": median([s.decode_tps(args.max_tokens) for s in streamed]),
        "ttft_ms": _ms(median([s.first_content for s in streamed])),
        "e2e_tps": median([s.e2e_tps(args.max_tokens) for s in plain]),
        "tokens": median([s.tokens(args.max_tokens)[0] for s in streamed]),
        "reps": args.reps, "errors": bad,
    }


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1000


def get_json(client: httpx.Client, url: str, path: str, method: str = "GET") -> dict[str, Any]:
    try:
        r = client.request(method, url + path, timeout=300)
        data = r.json()
        if not isinstance(data, dict):
            return {"status_code": r.status_code, "body": data}
        data.setdefault("_status_code", r.status_code)
        return data
    except (httpx.HTTPError, ValueError) as exc:
        return {"error": repr(exc)}


def print_plan(plan: Mapping[str, Any] | None, where: str) -> None:
    if not plan:
        log(f"  plan ({where}): none reported")
        return
    keys = ("n_gpu_layers", "max_layers", "gpu_bytes", "cpu_bytes", "weights_gpu_bytes",
            "weights_cpu_bytes", "kv_bytes_total", "kv_gpu_bytes", "compute_bytes",
            "margin_bytes", "free_vram_bytes", "n_ctx", "fits_all", "reason")
    parts = []
    for k in keys:
        if k in plan:
            v = plan[k]
            if isinstance(v, int) and "bytes" in k:
                v = f"{v / MiB:.1f} MiB"
            parts.append(f"{k}={v}")
    extra = [k for k in plan if k not in keys]
    log(f"  plan ({where}): " + ", ".join(parts) + (f" (+ {extra})" if extra else ""))


def gpu_phase(model: Path, args: argparse.Namespace, out: Path,
              backend: str = "llamacpp") -> dict[str, Any]:
    res: dict[str, Any] = {"memory": [], "backend": backend}
    mem = res["memory"]
    mem.append(memory_point("before the server starts", None, None, None))
    server = start_server(f"gpu-{backend}", model, args, out, args.n_gpu_layers, backend)
    client = httpx.Client(timeout=httpx.Timeout(300.0, connect=10.0))
    try:
        res["ready_seconds"] = server.wait_ready("/health", timeout=args.ready_timeout)
        pid = server.proc.pid
        url = server.url
        info = get_json(client, url, "/api/backend/info")
        res["engine"] = info.get("engine")
        res["default_plan"] = info.get("default_plan")
        engine = info.get("engine") or {}
        log(f"  engine: llama-cpp-python {engine.get('llama_cpp_python')}, "
            f"supports_gpu_offload={engine.get('supports_gpu_offload')}")
        log(f"  system_info: {engine.get('system_info')}")
        mem.append(memory_point("server up, preloaded model", client, url, pid))
        unload = get_json(client, url, "/api/models/default/unload", "POST")
        log(f"  unload (to measure the empty server): {_brief(unload)}")
        time.sleep(1.0)
        mem.append(memory_point("before load (server up, no model)", client, url, pid))
        print_plan(res["default_plan"], "/api/backend/info default_plan, no model loaded")
        t0 = time.monotonic()
        loaded = get_json(client, url, "/api/models/default/load", "POST")
        res["load_seconds_wall"] = round(time.monotonic() - t0, 3)
        res["load"] = loaded
        log(f"  load: {res['load_seconds_wall']} s wall; {_brief(loaded)}")
        mem.append(memory_point("after load", client, url, pid))
        status = get_json(client, url, "/status")
        models = status.get("loaded_models") or []
        res["status_model"] = models[0] if models else None
        res["plan"] = models[0].get("plan") if models else loaded.get("plan")
        print_plan(res["plan"], "/status loaded_models[0].plan")
        if models:
            log(f"  loaded: n_gpu_layers={models[0].get('n_gpu_layers')} of "
                f"{models[0].get('max_layers')}, memory={models[0].get('memory')}")
        sampler = Sampler(client, url, pid)
        sampler.start()
        long = timed_stream(client, url + "/v1/completions",
                            body(args, True, max_tokens=args.long_tokens))
        sampler.stop.set()
        sampler.join()
        peak = sampler.peak()
        res["long_generation"] = {"tokens": long.tokens(args.long_tokens)[0],
                                  "decode_tps": long.decode_tps(args.long_tokens),
                                  "seconds": long.total, "ok": long.ok}
        mem.append(peak)
        log(f"  VRAM {'during generation (peak)':<34} nvidia-smi used "
            f"{fmt(peak['smi_used_mib'], 0):>7} MiB | /vram used "
            f"{fmt(peak['vram_used_mib'], 0):>7} MiB ({peak['samples']} samples, "
            f"GPU util peak {fmt(peak['util_percent_peak'], 0)}%)")
        res["speed"] = speed(client, url, args)
        log(f"  speed (GPU, {res['plan'] and res['plan'].get('n_gpu_layers')} layers): "
            f"{_speed(res['speed'])}")
        unload = get_json(client, url, "/api/models/default/unload", "POST")
        log(f"  unload: {_brief(unload)}")
        time.sleep(1.0)
        mem.append(memory_point("after unload", client, url, pid))
        before = next((p for p in mem if p["label"].startswith("before load")), None)
        if before and before.get("smi_used_mib") is not None and \
                mem[-1].get("smi_used_mib") is not None:
            res["unload_back_to_baseline_mib"] = mem[-1]["smi_used_mib"] - before["smi_used_mib"]
            log(f"  after unload vs before load: {res['unload_back_to_baseline_mib']:+.0f} MiB "
                f"({'within' if abs(res['unload_back_to_baseline_mib']) <= 64 else 'NOT within'}"
                " 64 MiB)")
        ka = timed_request(client, url + "/v1/completions",
                           body(args, False, max_tokens=32, keep_alive=0))
        deadline = time.monotonic() + 15
        left: list[Any] = ["?"]
        while time.monotonic() < deadline:
            left = get_json(client, url, "/status").get("loaded_models") or []
            if not left:
                break
            time.sleep(0.25)
        res["keep_alive_0"] = {"ok": ka.ok, "seconds": ka.total,
                               "unloaded_after": not left, "error": ka.error or None}
        log(f"  keep_alive 0 request: ok={ka.ok} in {ka.total:.2f} s, "
            f"unloaded afterwards: {not left}")
        mem.append(memory_point("after a keep_alive:0 request", client, url, pid))
    finally:
        client.close()
        server.stop()
    time.sleep(1.0)
    mem.append(memory_point("after the server exits", None, None, None))
    return res


def fit_phase(model: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The layers llama-server's own --fit picks for this model and context."""
    port = free_port()
    proc = ManagedProcess("llama-server-fit", [
        str(args.llama_server_bin), "-m", str(model), "--host", "127.0.0.1", "--port",
        str(port), "-c", str(args.n_ctx), "--fit", "on", "-t", str(args.threads),
        "--no-webui"], url=f"http://127.0.0.1:{port}", log_dir=out)
    try:
        proc.wait_ready("/health", timeout=args.ready_timeout)
        text = proc.log_tail(400)
    finally:
        proc.stop()
    layers = [ln.strip() for ln in text.splitlines() if "offloaded" in ln and "layers" in ln]
    fit = [ln.strip() for ln in text.splitlines() if "fit" in ln.lower()][:12]
    log(f"  llama-server --fit: {layers[-1] if layers else 'no offload line in its log'}")
    return {"offload_line": layers[-1] if layers else None, "fit_lines": fit}


def bandwidth_gbps() -> float | None:
    """Device-to-device copy bandwidth (GB/s), with PyTorch if the image has it."""
    try:
        import torch  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    del a, b
    torch.cuda.empty_cache()
    return 2 * n * reps / seconds / 1e9  # a copy reads and writes every byte


def cpu_phase(model: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    server = start_server("cpu", model, args, out, "0")
    client = httpx.Client(timeout=httpx.Timeout(300.0, connect=10.0))
    try:
        ready = server.wait_ready("/health", timeout=args.ready_timeout)
        get_json(client, server.url, "/api/models/default/load", "POST")
        status = get_json(client, server.url, "/status")
        models = status.get("loaded_models") or []
        mem = memory_point("CPU server, model loaded", client, server.url, server.proc.pid)
        res: dict[str, Any] = {"ready_seconds": ready, "speed": speed(client, server.url, args),
               "n_gpu_layers": models[0].get("n_gpu_layers") if models else None,
               "memory": mem}
        log(f"  speed (CPU, n_gpu_layers={res['n_gpu_layers']}): {_speed(res['speed'])}")
        return res
    finally:
        client.close()
        server.stop()


def raw_phase(model: Path, args: argparse.Namespace, n_gpu_layers: int) -> dict[str, Any]:
    """Raw llama-cpp-python in a child process (so its GPU memory goes with it)."""
    cmd = [sys.executable, __file__, "--raw-worker", str(model), "--n-gpu-layers-raw",
           str(n_gpu_layers), "--threads", str(args.threads), "--n-ctx", str(args.n_ctx),
           "--max-tokens", str(args.max_tokens), "--reps", str(args.reps),
           "--prompt", args.prompt]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"error": "raw worker timed out"}
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            res: dict[str, Any] = json.loads(line)
            log(f"  speed (raw llama-cpp-python in-process, n_gpu_layers={n_gpu_layers}): "
                f"{_speed(res)}")
            return res
    return {"error": f"raw worker failed ({out.returncode}): {out.stderr[-2000:]}"}


def raw_worker(args: argparse.Namespace) -> int:
    import llama_cpp

    llm: Any = llama_cpp.Llama(model_path=args.raw_worker, n_ctx=args.n_ctx,
                          n_batch=min(512, args.n_ctx), n_threads=args.threads,
                          n_threads_batch=args.threads, n_gpu_layers=args.n_gpu_layers_raw,
                          verbose=False)
    kw = {"max_tokens": args.max_tokens, "temperature": 0.0, "seed": 42}
    dec: list[float | None] = []
    ttft: list[float | None] = []
    e2e: list[float | None] = []
    for rep in range(args.reps + 1):
        t0 = time.perf_counter()
        times = []
        for chunk in llm.create_completion(args.prompt, stream=True, **kw):
            if chunk["choices"][0].get("text"):
                times.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        out = llm.create_completion(args.prompt, **kw)
        total = time.perf_counter() - t1
        if rep == 0:
            continue  # warm-up
        n = out["usage"]["completion_tokens"]
        if len(times) >= 2:
            dec.append((n - 1) / (times[-1] - times[0]))
            ttft.append(times[0])
        e2e.append(n / total)
    print(json.dumps({"decode_tps": median(dec), "ttft_ms": _ms(median(ttft)),
                      "e2e_tps": median(e2e), "reps": args.reps}))
    return 0


def _speed(s: Mapping[str, Any]) -> str:
    return (f"decode {fmt(s.get('decode_tps'), 1)} tok/s, TTFT {fmt(s.get('ttft_ms'), 1)} ms,"
            f" non-streamed {fmt(s.get('e2e_tps'), 1)} tok/s end to end"
            + (f" ({s['tokens']:.0f} tokens)" if s.get("tokens") else ""))


def _brief(d: Mapping[str, Any]) -> str:
    keep = {k: d[k] for k in ("loaded", "unloaded", "id", "reason", "n_gpu_layers",
                              "load_seconds", "error", "_status_code") if k in d}
    return json.dumps(keep)[:400]


# --- report ---------------------------------------------------------------------------------


def report(result: Mapping[str, Any]) -> str:
    g = result.get("gpu") or {}
    lines = [f"# GPU check — {result['date']}", "",
             f"- device: {result['device']}",
             f"- model: `{result['model']['path']}` ({result['model']['note']})",
             f"- llama.cpp: {json.dumps((g.get('engine') or {}).get('supports_gpu_offload'))} "
             f"GPU offload; n_ctx {result['settings']['n_ctx']}, threads "
             f"{result['settings']['threads']}", ""]
    plan = g.get("plan") or {}
    if plan:
        lines += ["## Plan", "", md_table(["field", "value"], [
            [k, f"{v / MiB:.1f} MiB" if isinstance(v, int) and "bytes" in k else str(v)]
            for k, v in plan.items()]), ""]
    rows = [[p["label"], fmt(p.get("smi_used_mib"), 0), fmt(p.get("smi_process_mib"), 0),
             fmt(p.get("vram_used_mib"), 0), fmt(p.get("vram_ours_mib"), 0)]
            for p in g.get("memory", [])]
    if rows:
        lines += ["## VRAM (MiB)", "", md_table(
            ["when", "nvidia-smi used", "nvidia-smi our pid", "/vram used", "/vram ours"],
            rows, ["l", "r", "r", "r", "r"]), ""]
    mg = result.get("managed") or {}
    if mg.get("memory"):
        rows = [[p["label"], fmt(p.get("smi_used_mib"), 0),
                 ", ".join(f"{e['pid']}: {fmt(e['vram_mib'], 0)} (plan {fmt(e['planned_mib'], 0)})"
                           for e in p.get("engines", [])) or "-"]
                for p in mg["memory"]]
        lines += ["## Managed mode: VRAM (MiB), per engine process", "", md_table(
            ["when", "nvidia-smi used", "engine pid: NVML (planned)"], rows, ["l", "r", "l"]),
            "", f"- after unload vs before load: "
            f"{fmt(mg.get('unload_back_to_baseline_mib'), 0)} MiB (must be within 64)",
            f"- llama-server --fit: {(result.get('fit') or {}).get('offload_line')}; ours: "
            f"{(mg.get('plan') or {}).get('n_gpu_layers')} layers", ""]
    speeds = [("ours, GPU (auto layers)", (g.get("speed") or {})),
              ("ours, managed, GPU", mg.get("speed") or {}),
              ("raw llama-cpp-python, GPU (all layers)", result.get("raw_gpu") or {}),
              ("ours, CPU (0 layers)", (result.get("cpu") or {}).get("speed") or {}),
              ("raw llama-cpp-python, CPU", result.get("raw_cpu") or {})]
    lines += ["## Speed (medians)", "", md_table(
        ["system", "decode tok/s", "TTFT ms", "non-streamed tok/s"],
        [[n, fmt(s.get("decode_tps"), 1), fmt(s.get("ttft_ms"), 1), fmt(s.get("e2e_tps"), 1)]
         for n, s in speeds if s], ["l", "r", "r", "r"]), ""]
    gs, cs = g.get("speed") or {}, (result.get("cpu") or {}).get("speed") or {}
    on_gpu = bool((g.get("plan") or {}).get("n_gpu_layers"))
    where = "GPU" if on_gpu else "'GPU' phase (0 layers: CPU)"
    if gs.get("decode_tps") and cs.get("decode_tps"):
        lines.append(f"- {where} vs CPU, decode: {gs['decode_tps'] / cs['decode_tps']:.2f}×")
    rg = result.get("raw_gpu") or {}
    if gs.get("decode_tps") and rg.get("decode_tps"):
        lines.append(f"- ours vs raw, {where}, decode: "
                     f"{gs['decode_tps'] / rg['decode_tps']:.3f}×")
    if result.get("bandwidth_bound_tps") and gs.get("decode_tps"):
        lines.append(f"- decode vs the bandwidth bound ({result['copy_bandwidth_gbps']:.0f} GB/s "
                     f"copy): {gs['decode_tps'] / result['bandwidth_bound_tps']:.2f} of "
                     f"{result['bandwidth_bound_tps']:.0f} tok/s")
    for note in result.get("notes", []):
        lines.append(f"\n> {note}")
    return "\n".join(lines) + "\n"


def device_line() -> str:
    smi = nvidia_smi()
    if smi.get("gpus"):
        g = smi["gpus"][0]
        return f"{g['name']}, {g['total_mib']:.0f} MiB"
    return f"no GPU ({smi.get('reason')})"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="the GGUF to serve")
    p.add_argument("--model-note", default="", help="what the model is (printed with it)")
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="llama.cpp threads everywhere (default: the server's, half the CPUs)")
    p.add_argument("--n-gpu-layers", default=None,
                   help="ML_OFFLOAD_N_GPU_LAYERS for the GPU phase (default: unset = auto)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--long-tokens", type=int, default=512,
                   help="tokens of the generation during which VRAM is sampled")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--skip", default="", help="comma-separated phases to skip: cpu,raw")
    p.add_argument("--out", type=Path,
                   default=Path(os.environ.get("OUT") or "/tmp/gpu-check"))
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu-check-work"),
                   help="scratch space (the servers' registries)")
    p.add_argument("--llama-server-bin", type=Path, default=None,
                   help="a CUDA llama-server: also run managed mode and llama-server's --fit")
    p.add_argument("--raw-worker", help=argparse.SUPPRESS)
    p.add_argument("--n-gpu-layers-raw", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(list(argv))


def cli(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.raw_worker:
        return raw_worker(args)
    if args.model is None or not args.model.is_file():
        print(f"gpu_check: no model file ({args.model})", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    started = time.monotonic()
    result: dict[str, Any] = {
        "date": now_iso(), "device": device_line(), "machine": machine_info(),
        "model": {"path": str(args.model), "bytes": args.model.stat().st_size,
                  "note": args.model_note or "as given"},
        "settings": {"n_ctx": args.n_ctx, "threads": args.threads,
                     "max_tokens": args.max_tokens, "reps": args.reps,
                     "prompt": args.prompt, "n_gpu_layers": args.n_gpu_layers or "auto"},
        "notes": [],
    }
    log(f"== device: {result['device']}; model {args.model} ({result['model']['note']})")
    log(f"== GPU phase: our server, n_gpu_layers={args.n_gpu_layers or 'auto'}")
    try:
        result["gpu"] = gpu_phase(args.model, args, out)
    except Exception as exc:  # report what broke, then carry on with the other phases
        result["gpu"] = {"error": repr(exc)}
        log(f"  GPU phase failed: {exc!r}")
    if args.llama_server_bin:
        log("== managed mode: the model in its own (CUDA) llama-server process")
        try:
            result["managed"] = gpu_phase(args.model, args, out, "managed")
            result["fit"] = fit_phase(args.model, args, out)
        except Exception as exc:
            result["managed"] = {"error": repr(exc)}
            log(f"  managed phase failed: {exc!r}")
    bw = bandwidth_gbps()
    result["copy_bandwidth_gbps"] = bw
    weights = args.model.stat().st_size
    if bw:
        bound = bw * 1e9 / weights
        result["bandwidth_bound_tps"] = bound
        log(f"== bandwidth: {bw:.0f} GB/s device copy; {weights / MiB:.0f} MiB of weights per "
            f"token: at most {bound:.0f} tok/s")
    else:
        result["notes"].append("no PyTorch with CUDA here: the bandwidth bound was not measured")
    gpu_layers = ((result["gpu"].get("plan") or {}).get("n_gpu_layers") or 0)
    if "raw" not in skip:
        log("== raw llama-cpp-python in a child process (GPU: all layers)")
        result["raw_gpu"] = raw_phase(args.model, args, -1)
    if "cpu" not in skip:
        log("== CPU phase: our server, ML_OFFLOAD_N_GPU_LAYERS=0")
        try:
            result["cpu"] = cpu_phase(args.model, args, out)
        except Exception as exc:
            result["cpu"] = {"error": repr(exc)}
            log(f"  CPU phase failed: {exc!r}")
        if "raw" not in skip:
            result["raw_cpu"] = raw_phase(args.model, args, 0)
    if not gpu_layers:
        result["notes"].append("no layers were offloaded: the GPU phase ran on the CPU "
                               "(no GPU, no CUDA build, or the plan chose 0)")
    result["seconds"] = round(time.monotonic() - started, 1)
    write_json(out / "gpu_check.json", result)
    text = report(result)
    (out / "gpu_check.md").write_text(text)
    log("\n" + text)
    log(f"wrote {out}/gpu_check.json and gpu_check.md in {result['seconds']} s")
    return 0 if "error" not in result["gpu"] else 1


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(cli(sys.argv[1:]))
