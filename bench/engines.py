"""Managed-mode benchmark (issue 13): our engine processes against llama-server direct.

One run starts ml-offload in managed mode (the model in its own llama-server child), a
llama-server started with the very command line our engine got (same slots, context,
threads), and ml-offload in-process; then, alternating round by round:

* **one stream** of ``--max-tokens`` tokens (greedy, ``ignore_eos``), managed vs direct:
  time to first token and decode tokens/s; targets ≥ 0.97× decode, ≤ 5 ms more first token;
* **four concurrent streams** of ``--concurrent-tokens`` tokens: aggregate tokens/s (all
  tokens ÷ first send to last token) and the worst first token; targets ≥ 0.95× aggregate,
  worst first token ≤ 1.2× direct's;
* **load to first token**: unload the model, then time one chat (max_tokens 1) that loads it
  again, managed vs in-process; target: the process start adds ≤ 0.5 s.

Writes ``<out>/engines.json`` (machine, versions, command, settings, every sample) and
``<out>/engines.md``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    RESULTS_DIR,
    ManagedProcess,
    Sample,
    command_line,
    fmt,
    free_port,
    git_commit,
    loadavg,
    machine_info,
    md_table,
    median,
    now_iso,
    package_version,
    parse_shared_args,
    ratio,
    timed_stream,
    write_json,
)
from proxy import llama_server_binary

PROMPT = "Once upon a time, in a small village by the sea, there lived"
TARGETS = {"decode_ratio": 0.97, "ttft_added_ms": 5.0, "aggregate_ratio": 0.95,
           "worst_ttft_ratio": 1.2, "load_added_s": 0.5}


def ours(name: str, log_dir: Path, data: Path, model: Path, args: argparse.Namespace,
         **env: str) -> ManagedProcess:
    port = free_port()
    proc = ManagedProcess(name, [sys.executable, "-m", "mloffload.server"],
                          url=f"http://127.0.0.1:{port}", log_dir=log_dir, env={
                              "ML_OFFLOAD_PORT": str(port), "ML_OFFLOAD_DATA_DIR": str(data),
                              "ML_OFFLOAD_DEFAULT_MODEL": str(model),
                              "ML_OFFLOAD_N_CTX": str(args.n_ctx),
                              "ML_OFFLOAD_THREADS": str(args.threads),
                              "ML_OFFLOAD_KEEP_ALIVE": "-1", "ML_OFFLOAD_API_KEY": None,
                              "ML_OFFLOAD_CONFIG": None, **env})
    proc.wait_ready("/health")
    return proc


def engine_cmdline(url: str) -> list[str]:
    import psutil

    for _ in range(600):
        loaded = httpx.get(url + "/status", timeout=30).json()["loaded_models"]
        if loaded and loaded[0]["engine"].get("pid"):
            return list(psutil.Process(loaded[0]["engine"]["pid"]).cmdline())
        time.sleep(0.1)
    raise SystemExit("managed mode never loaded its model")


def concurrent_round(url: str, body: dict[str, Any], n: int) -> dict[str, Any]:
    """n streams sent at once; aggregate rate and worst first token."""
    clients = [httpx.Client(base_url=url, timeout=600, headers={"Connection": "close"})
               for _ in range(n)]
    try:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            samples = list(pool.map(lambda c: timed_stream(c, "/v1/completions", body),
                                    clients))
    finally:
        for c in clients:
            c.close()
    bad = [s for s in samples if not s.ok]
    if bad:
        raise SystemExit(f"concurrent stream failed: {bad[0].status} {bad[0].error}")
    tokens = sum(s.tokens(body["max_tokens"])[0] for s in samples)
    span = max(s.total for s in samples)
    return {"aggregate_tps": tokens / span if span > 0 else None,
            "worst_ttft_ms": max((s.first_content or 0) for s in samples) * 1000,
            "tokens": tokens, "seconds": span}


def load_round(url: str, model_id: str) -> float:
    """Unload, then one chat that loads the model again: seconds to its answer."""
    r = httpx.post(f"{url}/api/models/{model_id}/unload", timeout=120)
    if r.status_code != 200:
        raise SystemExit(f"unload failed: {r.status_code} {r.text}")
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", timeout=600, json={
        "model": model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
    if r.status_code != 200:
        raise SystemExit(f"chat after unload failed: {r.status_code} {r.text}")
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> int:
    from mloffload.config import default_data_dir
    from mloffload.models.catalog import ensure_embedded_model

    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    model = (Path(args.model).expanduser() if args.model else ensure_embedded_model(data_dir))
    model = model.resolve()
    binary = llama_server_binary(args.llama_server_bin)
    machine = machine_info()
    log_root = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="bench-"))
    print(f"engines benchmark: {model.name}, {args.reps} rounds; load "
          f"{machine['loadavg_at_start']}", file=sys.stderr)
    managed = ours("ml-offload-managed", log_root, log_root / "managed", model, args,
                   ML_OFFLOAD_BACKEND="managed", ML_OFFLOAD_LLAMA_SERVER_BIN=binary,
                   ML_OFFLOAD_PARALLEL=str(args.parallel))
    inproc = ours("ml-offload-inprocess", log_root, log_root / "inprocess", model, args,
                  ML_OFFLOAD_BACKEND="llamacpp")
    cmd = engine_cmdline(managed.url)
    port = free_port()
    cmd[cmd.index("--port") + 1] = str(port)
    if "--alias" in cmd:
        del cmd[cmd.index("--alias"):cmd.index("--alias") + 2]
    direct = ManagedProcess("llama-server-direct", cmd, url=f"http://127.0.0.1:{port}",
                            log_dir=log_root, env={"LLAMA_API_KEY": None})
    direct.wait_ready("/health")
    urls = {"direct": direct.url, "managed": managed.url}
    stream = {"prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 0,
              "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    conc = {**stream, "max_tokens": args.concurrent_tokens}
    model_id = httpx.get(managed.url + "/v1/models/default", timeout=30).json()["id"]
    single: dict[str, list[Sample]] = {"direct": [], "managed": []}
    together: dict[str, list[dict[str, Any]]] = {"direct": [], "managed": []}
    loads: dict[str, list[float]] = {"managed": [], "inprocess": []}
    try:
        for url in urls.values():  # warm up
            with httpx.Client(base_url=url, timeout=600) as c:
                timed_stream(c, "/v1/completions", {**stream, "max_tokens": 8})
        for i in range(args.reps):
            order = ["direct", "managed"] if i % 2 == 0 else ["managed", "direct"]
            if i:  # the load round left managed a new engine: its prompt cache warm again,
                for url in urls.values():  # as direct's is, before anything is timed
                    with httpx.Client(base_url=url, timeout=600) as c:
                        timed_stream(c, "/v1/completions", {**stream, "max_tokens": 8})
                        concurrent_round(url, {**conc, "max_tokens": 4}, 4)
            for p in order:
                with httpx.Client(base_url=urls[p], timeout=600,
                                  headers={"Connection": "close"}) as c:
                    s = timed_stream(c, "/v1/completions", stream)
                if not s.ok:
                    raise SystemExit(f"stream via {p} failed: {s.status} {s.error}")
                single[p].append(s)
            for p in order:
                together[p].append(concurrent_round(urls[p], conc, 4))
            for p in (["managed", "inprocess"] if i % 2 == 0 else ["inprocess", "managed"]):
                loads[p].append(load_round(managed.url if p == "managed" else inproc.url,
                                           model_id))
    finally:
        direct.stop()
        managed.stop()
        inproc.stop()
    result = summarize(args, single, together, loads)
    result.update({
        "benchmark": "engines", "date": now_iso(), "command": command_line(args.argv),
        "git_commit": git_commit(), "machine": machine, "loadavg_at_end": loadavg(),
        "versions": {"ml-offload": package_version("ml-offload")},
        "settings": {"model": str(model), "n_ctx": args.n_ctx, "threads": args.threads,
                     "parallel": args.parallel, "max_tokens": args.max_tokens,
                     "concurrent_tokens": args.concurrent_tokens, "reps": args.reps,
                     "engine_command": cmd},
        "samples": {
            "single_ttft_ms": {p: [(s.first_content or 0) * 1000 for s in v]
                               for p, v in single.items()},
            "single_decode_tps": {p: [s.decode_tps(args.max_tokens) for s in v]
                                  for p, v in single.items()},
            "concurrent": together, "load_to_first_token_s": loads,
        },
    })
    out = Path(args.out)
    write_json(out / "engines.json", result)
    (out / "engines.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def summarize(args: argparse.Namespace, single: dict[str, list[Sample]],
              together: dict[str, list[dict[str, Any]]],
              loads: dict[str, list[float]]) -> dict[str, Any]:
    tps = {p: median([s.decode_tps(args.max_tokens) for s in v]) for p, v in single.items()}
    ttft = {p: median([(s.first_content or 0) * 1000 for s in v]) for p, v in single.items()}
    agg = {p: median([r["aggregate_tps"] for r in v]) for p, v in together.items()}
    worst = {p: median([r["worst_ttft_ms"] for r in v]) for p, v in together.items()}
    load = {p: median(v) for p, v in loads.items()}
    got = {
        "decode_ratio": ratio(tps["managed"], tps["direct"]),
        "ttft_added_ms": (ttft["managed"] or 0) - (ttft["direct"] or 0),
        "aggregate_ratio": ratio(agg["managed"], agg["direct"]),
        "worst_ttft_ratio": ratio(worst["managed"], worst["direct"]),
        "load_added_s": (load["managed"] or 0) - (load["inprocess"] or 0),
    }
    met = {
        "decode_ratio": (got["decode_ratio"] or 0) >= TARGETS["decode_ratio"],
        "ttft_added_ms": got["ttft_added_ms"] <= TARGETS["ttft_added_ms"],
        "aggregate_ratio": (got["aggregate_ratio"] or 0) >= TARGETS["aggregate_ratio"],
        "worst_ttft_ratio": (got["worst_ttft_ratio"] or 99) <= TARGETS["worst_ttft_ratio"],
        "load_added_s": got["load_added_s"] <= TARGETS["load_added_s"],
    }
    return {"single": {"decode_tps": tps, "ttft_ms": ttft},
            "concurrent": {"aggregate_tps": agg, "worst_ttft_ms": worst},
            "load_to_first_token_s": load, "got": got, "targets": TARGETS, "met": met}


def markdown(r: dict[str, Any]) -> str:
    m, st, g, met = r["machine"], r["settings"], r["got"], r["met"]
    s, c, ld = r["single"], r["concurrent"], r["load_to_first_token_s"]

    def ok(k: str) -> str:
        return "met" if met[k] else "NOT met"

    rows = [
        ["one stream: decode tok/s", fmt(s["decode_tps"]["direct"]),
         fmt(s["decode_tps"]["managed"]), f"{fmt(g['decode_ratio'], 3)}× ({ok('decode_ratio')})"],
        ["one stream: first token (ms)", fmt(s["ttft_ms"]["direct"]),
         fmt(s["ttft_ms"]["managed"]), f"+{fmt(g['ttft_added_ms'])} ms ({ok('ttft_added_ms')})"],
        ["4 streams: aggregate tok/s", fmt(c["aggregate_tps"]["direct"]),
         fmt(c["aggregate_tps"]["managed"]),
         f"{fmt(g['aggregate_ratio'], 3)}× ({ok('aggregate_ratio')})"],
        ["4 streams: worst first token (ms)", fmt(c["worst_ttft_ms"]["direct"]),
         fmt(c["worst_ttft_ms"]["managed"]),
         f"{fmt(g['worst_ttft_ratio'], 2)}× ({ok('worst_ttft_ratio')})"],
    ]
    cpu = m["cpu"]
    return "\n".join([
        "# Managed-mode benchmark: engine processes vs llama-server direct", "",
        f"- **Date**: {r['date']} (git {r['git_commit']})",
        f"- **Command**: `{r['command']}`",
        f"- **Machine**: {cpu['model']}, {m['cpus_usable']} usable CPUs, {m['memory_gib']} GiB, "
        f"{m['os']}, Python {m['python']}; load average {m['loadavg_at_start']} at start, "
        f"{r['loadavg_at_end']} at end",
        f"- **Settings**: `{Path(st['model']).name}`, {st['parallel']} slots, n_ctx "
        f"{st['n_ctx']} per slot, {st['threads']} threads; one stream {st['max_tokens']} "
        f"tokens, concurrent streams {st['concurrent_tokens']} tokens each; {st['reps']} "
        "rounds, paths alternating",
        f"- **Direct llama-server command** (our engine's own, on another port): "
        f"`{' '.join(st['engine_command'])}`", "",
        md_table(["", "llama-server direct", "ml-offload managed", "ratio (target)"], rows,
                 ["l", "r", "r", "r"]), "",
        f"**Load to first token** (unload, then one chat of 1 token): managed "
        f"{fmt(ld['managed'], 2)} s, in-process {fmt(ld['inprocess'], 2)} s: the process "
        f"start adds {fmt(g['load_added_s'], 2)} s (target ≤ {TARGETS['load_added_s']} s: "
        f"{ok('load_added_s')}).", "",
    ])


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/engines.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--reps", type=int, default=6, help="rounds (each runs every part)")
    p.add_argument("--max-tokens", type=int, default=96, help="tokens of the single stream")
    p.add_argument("--concurrent-tokens", type=int, default=64,
                   help="tokens of each of the four concurrent streams")
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--model", help="a .gguf file (default: the embedded Gemma 3 270M)")
    p.add_argument("--data-dir", help="where the embedded model is assembled")
    p.add_argument("--llama-server-bin", help="llama-server binary (default: this machine's "
                   "build, via python/mloffload/engine/build.py)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="results folder")
    p.add_argument("--log-dir", help="keep the servers' logs here (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="2 rounds")
    args = parse_shared_args(p, argv, "engines")
    if args.quick:
        args.reps = 2
    args.argv = ["bench/engines.py", *argv]
    return args


def main(argv: Sequence[str]) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
