"""Proxy benchmark (issue 5): what our server adds in front of llama.cpp's ``llama-server``.

One run starts one llama-server and our server (``ML_OFFLOAD_BACKEND=llama-server``) in
front of it, then sends the same requests straight to llama-server and through our server,
alternating request by request (the first of each pair alternates too), so a busy machine's
drift hits both alike:

* **latency** of a short completion (non-streamed, ``max_tokens`` 1, the same prompt, which
  llama-server's prompt cache keeps warm): p50 and p99 per path, and the median of the
  paired differences — the proxy's added latency, target ≤ 2 ms at p50;
* **streamed completions** of ``--max-tokens`` tokens (greedy, ``ignore_eos``): time to
  first token and decode tokens/s ((tokens − 1) / (last − first text event)); target: the
  proxy's decode rate ≥ 0.97× direct.

Each path has its own keep-alive ``httpx.Client``, as a real client would. Writes
``<out>/proxy.json`` (machine, versions, command, settings, every sample's numbers) and
``<out>/proxy.md``.

``--via upstreams`` measures the router instead (issue 18): our server runs its own
in-process backend and has the llama-server as a remote upstream (``ML_OFFLOAD_UPSTREAMS``),
the requests name the upstream's model (``--alias``), and the files are
``proxy-upstreams.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
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
    percentile,
    ratio,
    timed_request,
    timed_stream,
    write_json,
)

PATHS = ("direct", "proxy")
LABELS = {"direct": "straight to llama-server", "proxy": "through ml-offload"}
SHORT_PROMPT = "The capital of France is"
STREAM_PROMPT = "Once upon a time, in a small village by the sea, there lived"
ADDED_P50_TARGET_MS = 2.0
THROUGHPUT_TARGET = 0.97
UPSTREAM_ALIAS = "bench-upstream"  # the llama-server's model name (--via upstreams asks for it)


def llama_server_binary(explicit: str | None) -> str:
    """``--llama-server-bin``, then $ML_OFFLOAD_LLAMA_SERVER_BIN, then the build script
    (which builds into ~/.cache/ml-offload only when the binary is missing)."""
    for cand in (explicit, os.environ.get("ML_OFFLOAD_LLAMA_SERVER_BIN")):
        if cand and os.access(cand, os.X_OK):
            return cand
    out = subprocess.run([sys.executable, str(REPO / "python/mloffload/engine/build.py"),
                          "llama-server"], stdout=subprocess.PIPE, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def start(args: argparse.Namespace, model: Path, binary: str,
          log_dir: Path) -> tuple[ManagedProcess, ManagedProcess]:
    up_port, our_port = free_port(), free_port()
    upstream = ManagedProcess(
        "llama-server",
        [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(up_port),
         "-c", str(args.n_ctx), "-t", str(args.threads), "-tb", str(args.threads),
         "-ngl", str(args.n_gpu_layers), "-np", "1", "--chat-template", "gemma", "--no-webui",
         *(["--alias", UPSTREAM_ALIAS] if args.via == "upstreams" else [])],
        url=f"http://127.0.0.1:{up_port}", log_dir=log_dir)
    upstream.wait_ready("/health")
    backend: dict[str, str | None] = {
        "ML_OFFLOAD_BACKEND": "llama-server", "ML_OFFLOAD_LLAMACPP_URL": upstream.url,
        "ML_OFFLOAD_UPSTREAMS": None}
    if args.via == "upstreams":  # our own engine in-process, the llama-server a remote one
        backend = {"ML_OFFLOAD_BACKEND": "llamacpp", "ML_OFFLOAD_UPSTREAMS": upstream.url,
                   "ML_OFFLOAD_THREADS": "1"}
    ours = ManagedProcess(
        "ml-offload", [sys.executable, "-m", "mloffload.server"],
        url=f"http://127.0.0.1:{our_port}", log_dir=log_dir,
        env={**backend,
             "ML_OFFLOAD_PORT": str(our_port), "ML_OFFLOAD_DATA_DIR": str(log_dir / "data"),
             "ML_OFFLOAD_DEFAULT_MODEL": str(model), "ML_OFFLOAD_API_KEY": None,
             "ML_OFFLOAD_CONFIG": None})
    ours.wait_ready("/health")
    return upstream, ours


def paired(n: int, run_one: Any) -> dict[str, list[Sample]]:
    """n rounds; each round runs both paths, the first of the pair alternating."""
    out: dict[str, list[Sample]] = {p: [] for p in PATHS}
    for i in range(n):
        for path in (PATHS if i % 2 == 0 else PATHS[::-1]):
            out[path].append(run_one(path))
    return out


def check(samples: dict[str, list[Sample]], what: str) -> None:
    for path, ss in samples.items():
        bad = [s for s in ss if not s.ok]
        if bad:
            raise SystemExit(f"{what} via {path} failed: {bad[0].status} {bad[0].error}")


def ms(x: float | None) -> float | None:
    return None if x is None else x * 1000.0


def run(args: argparse.Namespace) -> int:
    from mloffload.config import default_data_dir
    from mloffload.models.catalog import ensure_embedded_model

    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    model = (Path(args.model).expanduser() if args.model else ensure_embedded_model(data_dir))
    binary = llama_server_binary(args.llama_server_bin)
    machine = machine_info()
    print(f"proxy benchmark: {model.name}, {args.latency_reps} latency pairs, "
          f"{args.stream_reps} stream pairs of {args.max_tokens} tokens, threads={args.threads}; "
          f"load {machine['loadavg_at_start']}", file=sys.stderr)
    log_root = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="bench-"))
    upstream, ours = start(args, model.resolve(), binary, log_root)
    urls = {"direct": upstream.url, "proxy": ours.url}
    # llama-server drops a connection idle for 5 s, and one that carried a stream: both
    # paths' clients let go of idle connections sooner and close after every stream.
    limits = httpx.Limits(keepalive_expiry=2.0)
    clients = {p: httpx.Client(base_url=urls[p], timeout=600, limits=limits) for p in PATHS}
    streamers = {p: httpx.Client(base_url=urls[p], timeout=600, headers={"Connection": "close"})
                 for p in PATHS}
    named = {"model": UPSTREAM_ALIAS} if args.via == "upstreams" else {}
    # Greedy, so no seed is needed; a seeded request would go out with cache_prompt false
    # (our seed rule) and re-evaluate its prompt, which direct requests do not.
    seeded = {} if args.seed is None else {"seed": args.seed, "cache_prompt": False}
    short = {**named, "prompt": SHORT_PROMPT, "max_tokens": 1, "temperature": 0, **seeded}
    stream = {**named, "prompt": STREAM_PROMPT, "max_tokens": args.max_tokens, "temperature": 0,
              **seeded, "ignore_eos": True, "stream": True,
              "stream_options": {"include_usage": True}}
    try:
        for p in PATHS:  # warm up: connections, prompt cache, our model catalog
            for _ in range(args.warmup):
                check({p: [timed_request(clients[p], "/v1/completions", short)]}, "warm-up")
                check({p: [timed_stream(streamers[p], "/v1/completions",
                                        {**stream, "max_tokens": 8})]}, "warm-up")
        cpu0 = ours.cpu_seconds()
        latency = paired(args.latency_reps,
                         lambda p: timed_request(clients[p], "/v1/completions", short))
        check(latency, "short completion")
        cpu1 = ours.cpu_seconds()
        streams = paired(args.stream_reps,
                         lambda p: timed_stream(streamers[p], "/v1/completions", stream))
        check(streams, "streamed completion")
        cpu2 = ours.cpu_seconds()
    finally:
        for c in [*clients.values(), *streamers.values()]:
            c.close()
        ours.stop()
        upstream.stop()
    result = summarize(args, latency, streams)
    if cpu0 is not None and cpu1 is not None and cpu2 is not None:
        tokens = sum(s.tokens(args.max_tokens)[0] for s in streams["proxy"])
        result["proxy_cpu"] = {  # our server's own CPU time (user + system), proxy path only
            "ms_per_short_request": (cpu1 - cpu0) * 1000 / args.latency_reps,
            "us_per_streamed_token": (cpu2 - cpu1) * 1e6 / max(tokens, 1),
        }
    texts = {p: {s.text for s in streams[p]} for p in PATHS}
    result.update({
        "benchmark": "proxy", "date": now_iso(), "command": command_line(args.argv),
        "git_commit": git_commit(), "machine": machine, "loadavg_at_end": loadavg(),
        "versions": {"ml-offload": package_version("ml-offload"),
                     "httpx": package_version("httpx"), "uvicorn": package_version("uvicorn"),
                     "llama_server": _version(binary)},
        "settings": {"via": args.via, "model": str(model), "n_ctx": args.n_ctx,
                     "threads": args.threads,
                     "n_gpu_layers": args.n_gpu_layers, "max_tokens": args.max_tokens,
                     "seed": args.seed, "latency_reps": args.latency_reps,
                     "stream_reps": args.stream_reps, "warmup": args.warmup,
                     "short_prompt": SHORT_PROMPT, "stream_prompt": STREAM_PROMPT},
        "same_text": texts["direct"] == texts["proxy"] and len(texts["direct"]) == 1,
        "samples": {
            "latency_ms": {p: [ms(s.total) for s in latency[p]] for p in PATHS},
            "ttft_ms": {p: [ms(s.first_content) for s in streams[p]] for p in PATHS},
            "decode_tps": {p: [s.decode_tps(args.max_tokens) for s in streams[p]]
                           for p in PATHS},
        },
    })
    out = Path(args.out)
    name = "proxy" if args.via == "llama-server" else "proxy-upstreams"
    write_json(out / f"{name}.json", result)
    (out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def _version(binary: str) -> str | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return next((ln for ln in (out.stdout + out.stderr).splitlines()
                 if ln.startswith("version")), None)


def summarize(args: argparse.Namespace, latency: dict[str, list[Sample]],
              streams: dict[str, list[Sample]]) -> dict[str, Any]:
    lat = {p: [s.total * 1000 for s in latency[p]] for p in PATHS}
    diffs = [b - a for a, b in zip(lat["direct"], lat["proxy"], strict=True)]
    out: dict[str, Any] = {"paths": LABELS, "latency_ms": {}, "stream": {}}
    for p in PATHS:
        out["latency_ms"][p] = {"p50": median(lat[p]), "p99": percentile(lat[p], 99),
                                "mean": statistics.fmean(lat[p])}
        ttft = [ms(s.first_content) for s in streams[p]]
        tps = [s.decode_tps(args.max_tokens) for s in streams[p]]
        tokens = sorted({s.tokens(args.max_tokens)[0] for s in streams[p]})
        out["stream"][p] = {"ttft_ms_p50": median(ttft), "ttft_ms_p99": percentile(ttft, 99),
                            "decode_tps_median": median(tps), "tokens": tokens}
    d, x = out["latency_ms"]["direct"], out["latency_ms"]["proxy"]
    sd, sx = out["stream"]["direct"], out["stream"]["proxy"]
    added_p50 = x["p50"] - d["p50"]
    tput = ratio(sx["decode_tps_median"], sd["decode_tps_median"])
    out["added"] = {
        "latency_p50_ms": added_p50,
        "latency_p99_ms": x["p99"] - d["p99"],
        "latency_paired_median_ms": median(diffs),
        "ttft_p50_ms": (sx["ttft_ms_p50"] or 0) - (sd["ttft_ms_p50"] or 0),
        "decode_throughput_ratio": tput,
    }
    out["targets"] = {
        "added_latency_p50_ms": ADDED_P50_TARGET_MS,
        "decode_throughput_ratio": THROUGHPUT_TARGET,
        # Judged on the paired differences: robust to the machine's drift, which moves both
        # paths' p50 alike but not always within the same few milliseconds.
        "latency_met": median(diffs) is not None and median(diffs) <= ADDED_P50_TARGET_MS,
        "throughput_met": tput is not None and tput >= THROUGHPUT_TARGET,
    }
    return out


def markdown(r: dict[str, Any]) -> str:
    m, st, a, t = r["machine"], r["settings"], r["added"], r["targets"]
    cpu = m["cpu"]
    lat, s = r["latency_ms"], r["stream"]
    rows = [
        ["short completion latency p50 (ms)", fmt(lat["direct"]["p50"], 2),
         fmt(lat["proxy"]["p50"], 2), f"+{fmt(a['latency_p50_ms'], 2)} ms"],
        ["short completion latency p99 (ms)", fmt(lat["direct"]["p99"], 2),
         fmt(lat["proxy"]["p99"], 2), f"+{fmt(a['latency_p99_ms'], 2)} ms"],
        ["paired difference, median (ms)", "", "", f"+{fmt(a['latency_paired_median_ms'], 2)} ms"],
        ["time to first token p50 (ms)", fmt(s["direct"]["ttft_ms_p50"], 1),
         fmt(s["proxy"]["ttft_ms_p50"], 1), f"+{fmt(a['ttft_p50_ms'], 1)} ms"],
        ["decode tokens/s (median)", fmt(s["direct"]["decode_tps_median"], 1),
         fmt(s["proxy"]["decode_tps_median"], 1), f"{fmt(a['decode_throughput_ratio'], 3)}×"],
    ]
    verdict = (f"added latency (median of paired differences) ≤ "
               f"{t['added_latency_p50_ms']:g} ms: "
               f"{'met' if t['latency_met'] else 'NOT met'}; decode ≥ "
               f"{t['decode_throughput_ratio']:g}× direct: "
               f"{'met' if t['throughput_met'] else 'NOT met'}")
    how = ("as a remote upstream of our router (`--via upstreams`: in-process backend "
           "beside it, requests name its model)" if st.get("via") == "upstreams" else
           "with `--backend llama-server`")
    return "\n".join([
        "# Proxy benchmark: ml-offload in front of llama-server",
        "",
        f"- **How**: llama-server {how}",
        f"- **Date**: {r['date']} (git {r['git_commit']})",
        f"- **Command**: `{r['command']}`",
        f"- **Machine**: {cpu['model']}, {m['cpus_usable']} usable CPUs, "
        f"{m['memory_gib']} GiB, {m['os']}, Python {m['python']}; load average "
        f"{m['loadavg_at_start']} at start, {r['loadavg_at_end']} at end",
        f"- **llama-server**: {r['versions']['llama_server']}, 1 slot, "
        f"{st['threads']} threads, n_ctx {st['n_ctx']}, -ngl {st['n_gpu_layers']}",
        f"- **Model**: `{Path(st['model']).name}`; greedy; short completion = "
        f"max_tokens 1 ({st['latency_reps']} pairs); streams = {st['max_tokens']} tokens with "
        f"ignore_eos ({st['stream_reps']} pairs); both paths alternate request by request",
        f"- **Same streamed text on both paths**: {r['same_text']}",
        *([f"- **Our server's CPU time** (user + system): "
           f"{fmt(r['proxy_cpu']['ms_per_short_request'], 2)} ms per short request, "
           f"{fmt(r['proxy_cpu']['us_per_streamed_token'], 0)} µs per streamed token"]
          if r.get("proxy_cpu") else []),
        "",
        md_table(["", LABELS["direct"], LABELS["proxy"], "proxy adds"], rows,
                 ["l", "r", "r", "r"]),
        "",
        f"**Targets**: {verdict}.",
        "",
    ])


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/proxy.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--latency-reps", type=int, default=200,
                   help="short-completion pairs (one request per path each)")
    p.add_argument("--stream-reps", type=int, default=10, help="streamed-completion pairs")
    p.add_argument("--warmup", type=int, default=3, help="untimed requests per path first")
    p.add_argument("--max-tokens", type=int, default=96, help="tokens per streamed completion")
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--seed", type=int, default=None,
                   help="send this seed, with cache_prompt false on both paths (our seed rule)")
    p.add_argument("--model", help="a .gguf file (default: the embedded Gemma 3 270M)")
    p.add_argument("--data-dir", help="where the embedded model is assembled "
                   "(default: the server's data dir)")
    p.add_argument("--llama-server-bin", help="llama-server binary (default: "
                   "$ML_OFFLOAD_LLAMA_SERVER_BIN, else python/mloffload/engine/build.py)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="results folder")
    p.add_argument("--log-dir", help="keep the servers' logs here (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="30 latency + 3 stream pairs")
    p.add_argument("--via", choices=("llama-server", "upstreams"), default="llama-server",
                   help="our server as the llama-server backend, or as a router with the "
                   "llama-server as its remote upstream")
    args = parse_shared_args(p, argv, "proxy")
    if args.quick:
        args.latency_reps, args.stream_reps, args.warmup = 30, 3, 1
    args.argv = ["bench/proxy.py", *argv]
    return args


def main(argv: Sequence[str]) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
