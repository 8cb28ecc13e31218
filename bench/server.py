"""Server benchmark (issue 2): decode tokens/s and time to first token, streamed and not,
through our server vs raw llama-cpp-python in-process vs llama-cpp-python's own server
(``llama_cpp.server``), with llama.cpp's ``llama-server`` as an extra reference line.

One run, one model (the embedded Gemma 3 270M Q4_K_M unless ``--model``), one prompt per
request kind, the same settings everywhere: greedy decoding (temperature 0, the same top-k /
top-p / min-p, repeat penalty 1), a fixed seed and max_tokens, the same n_ctx, n_batch and
thread count, no GPU layers. The systems take turns request by request, with the starting
system rotated every repetition, so drift on a busy machine hits them all alike; medians are
reported.

What "raw" means: ``llama_cpp.Llama`` loaded in this benchmark's own process with the same
constructor arguments as our engine (n_ctx, n_batch = min(512, n_ctx), n_threads and
n_threads_batch, n_gpu_layers, chat_format="gemma" because the GGUF has no template), called
as ``create_completion(prompt, stream=...)`` and ``create_chat_completion(messages,
stream=...)`` with the same sampling arguments. Times are taken around the Python call and
on every chunk the iterator yields: no HTTP, no JSON, no threads. It is the baseline the
issue's "≥ 0.97× raw" is measured against. A stricter floor, "raw_generate", is also shown:
``Llama.generate`` plus ``llama_token_to_piece`` in a bare loop, which is what our engine
drives; create_completion's own per-token Python (completion dicts, stop-string and UTF-8
bookkeeping) is not in it.

Measures, per request: TTFT (send → first event carrying non-empty text), decode tokens/s
((tokens − 1) / (last text event − first text event)), total latency, and the serving
process's CPU time. Tokens come from the server's ``usage`` where it gives one (ours and
llama-server send a usage chunk with ``stream_options.include_usage``), else from
``finish_reason == "length"`` (= max_tokens), else one per text event; the JSON records
which. The prompts are chosen so that the base model never stops early; the run checks that
every system generated the same number of tokens and the same text.

Writes ``<out>/server.json`` (every sample, the machine, versions, command, date),
``<out>/server.md`` (tables with ratios vs raw and vs llama_cpp.server) and
``<out>/server.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from mloffload.engine.build import pinned_version

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
    percentile,
    ratio,
    timed_request,
    timed_stream,
    write_json,
)

SYSTEMS = ("ours", "raw", "raw_generate", "llama_cpp_server", "llama_server")
LABELS = {
    "ours": "ml-offload server",
    "raw": "raw llama-cpp-python (in-process)",
    "raw_generate": "raw Llama.generate loop (in-process)",
    "llama_cpp_server": "llama_cpp.server",
    "llama_server": "llama.cpp llama-server",
}
CASES = ("completion-stream", "chat-stream", "completion", "chat")

# A base model continues these for well over 96 tokens at temperature 0 (checked per run).
COMPLETION_PROMPT = "Once upon a time"
CHAT_PROMPT = "Write a long story about a dragon who learns to fly."

TARGET_TPS_VS_RAW = 0.97
TARGET_TTFT_OVERHEAD_MS = 10.0
TARGET_VS_LLAMA_CPP_SERVER = 1.0


@dataclasses.dataclass(frozen=True)
class Settings:
    model: Path
    n_ctx: int
    threads: int
    n_gpu_layers: int
    max_tokens: int
    seed: int | None
    completion_prompt: str
    chat_prompt: str

    @property
    def n_batch(self) -> int:
        return min(512, self.n_ctx)

    def sampling(self) -> dict[str, Any]:
        seed = {} if self.seed is None else {"seed": self.seed}
        return {"max_tokens": self.max_tokens, "temperature": 0.0, "top_p": 0.95, "top_k": 40,
                "min_p": 0.05, "repeat_penalty": 1.0, **seed}

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.chat_prompt}]


def case_parts(case: str) -> tuple[str, bool]:
    kind, _, mode = case.partition("-")
    return kind, mode == "stream"


# --- the systems ----------------------------------------------------------------------------


class System:
    name: str
    description: str = ""
    version: str | None = None
    command: list[str] | None = None

    def run(self, case: str) -> Sample:
        raise NotImplementedError

    def close(self) -> None:
        pass


class RawSystem(System):
    """llama_cpp.Llama in this process, called as the servers call it."""

    name = "raw"

    def __init__(self, s: Settings) -> None:
        import llama_cpp

        self.s = s
        self.version = package_version("llama_cpp_python")
        self.description = (
            "llama_cpp.Llama in the benchmark process (n_ctx, n_batch, threads, n_gpu_layers "
            "and flash attention as ours; chat_format='gemma'); create_completion / "
            "create_chat_completion with the same sampling arguments; timed around the call "
            "and at each yielded chunk")
        self.llm = llama_cpp.Llama(
            model_path=str(s.model), n_ctx=s.n_ctx, n_batch=s.n_batch, n_threads=s.threads,
            n_threads_batch=s.threads, n_gpu_layers=s.n_gpu_layers, chat_format="gemma",
            flash_attn=True, verbose=False)

    def _call(self, kind: str, stream: bool) -> Any:
        kw = self.s.sampling()
        if kind == "chat":
            messages: Any = self.s.messages()
            return self.llm.create_chat_completion(messages, stream=stream, **kw)
        return self.llm.create_completion(self.s.completion_prompt, stream=stream, **kw)

    def run(self, case: str) -> Sample:
        kind, stream = case_parts(case)
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        if not stream:
            out = self._call(kind, False)
            sample = Sample(ok=True, status=200, total=time.perf_counter() - t0)
            choice = out["choices"][0]
            sample.text = (choice["message"]["content"] if kind == "chat" else choice["text"]) or ""
            sample.finish_reason = choice.get("finish_reason")
            sample.prompt_tokens = out["usage"]["prompt_tokens"]
            sample.completion_tokens = out["usage"]["completion_tokens"]
            sample.first_content = sample.last_content = sample.total
            sample.content_events = 1
        else:
            sample = Sample(ok=True, status=200)
            for chunk in self._call(kind, True):
                t = time.perf_counter() - t0
                choice = chunk["choices"][0]
                text = (choice.get("delta", {}).get("content") if kind == "chat"
                        else choice.get("text")) or ""
                if choice.get("finish_reason"):
                    sample.finish_reason = choice["finish_reason"]
                if text:
                    sample.add_text(t, text)
            sample.total = time.perf_counter() - t0
        sample.cpu_seconds = time.process_time() - cpu0
        return sample

    def close(self) -> None:
        self.llm.close()


class RawGenerateSystem(System):
    """The floor for any Python server on llama-cpp-python: ``Llama.generate`` and
    ``llama_token_to_piece`` in a loop, as our engine drives them, with nothing around it."""

    name = "raw_generate"

    def __init__(self, s: Settings) -> None:
        import llama_cpp
        from llama_cpp.llama_chat_format import format_gemma

        self.s = s
        self._lib = llama_cpp
        self.version = package_version("llama_cpp_python")
        self.description = (
            "a second llama_cpp.Llama in the benchmark process, same arguments; "
            "Llama.generate(tokens, temp=0, top_k/top_p/min_p, repeat_penalty=1) and "
            "llama_token_to_piece per token, stopping at end-of-generation tokens or "
            "max_tokens (the chat prompt rendered by llama-cpp-python's 'gemma' format): "
            "no completion dicts, no stop strings, no HTTP")
        self.llm = llama_cpp.Llama(
            model_path=str(s.model), n_ctx=s.n_ctx, n_batch=s.n_batch, n_threads=s.threads,
            n_threads_batch=s.threads, n_gpu_layers=s.n_gpu_layers, flash_attn=True,
            verbose=False)
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        chat: Any = format_gemma(messages=s.messages())
        self._prompts = {
            "completion": self.llm.tokenize(s.completion_prompt.encode(), add_bos=True,
                                            special=True),
            "chat": self.llm.tokenize(chat.prompt.encode(), add_bos=True, special=True),
        }

    def run(self, case: str) -> Sample:
        import codecs
        import ctypes

        kind, stream = case_parts(case)
        lib, vocab, llm = self._lib, self._vocab, self.llm
        buf = ctypes.create_string_buffer(256)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        sample = Sample(ok=True, status=200, finish_reason="length")
        parts: list[str] = []  # non-streamed: no per-token bookkeeping
        n = 0
        if self.s.seed is not None:
            llm.set_seed(self.s.seed)
        for token in llm.generate(self._prompts[kind], top_k=40, top_p=0.95, min_p=0.05,
                                  temp=0.0, repeat_penalty=1.0):
            if lib.llama_vocab_is_eog(vocab, token):
                sample.finish_reason = "stop"
                break
            n += 1
            size = lib.llama_token_to_piece(vocab, token, buf, 256, 0, False)
            text = decoder.decode(buf.raw[:size]) if size > 0 else ""
            if text:
                if stream:
                    sample.add_text(time.perf_counter() - t0, text)
                else:
                    parts.append(text)
            if n >= self.s.max_tokens:
                break
        sample.total = time.perf_counter() - t0
        if not stream:
            sample.add_text(sample.total, "".join(parts))
        sample.prompt_tokens = len(self._prompts[kind])
        sample.completion_tokens = n
        sample.cpu_seconds = time.process_time() - cpu0
        return sample

    def close(self) -> None:
        self.llm.close()


class HTTPSystem(System):
    """A server in a subprocess, driven by the timing client."""

    model_name = "default"
    ready_path = "/health"

    def __init__(self, s: Settings, name: str, cmd: Sequence[str], log_dir: Path,
                 env: Mapping[str, str | None] | None = None, port: int | None = None) -> None:
        self.s = s
        self.name = name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = list(cmd)
        self.proc = ManagedProcess(name, cmd, url=self.url, log_dir=log_dir, env=env)
        self.client = httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0))

    def wait_ready(self) -> float:
        return self.proc.wait_ready(self.ready_path)

    def body(self, kind: str, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model_name, **self.s.sampling(), "stream": stream}
        if kind == "chat":
            body["messages"] = self.s.messages()
        else:
            body["prompt"] = self.s.completion_prompt
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def run(self, case: str) -> Sample:
        kind, stream = case_parts(case)
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        cpu0 = self.proc.cpu_seconds()
        call = timed_stream if stream else timed_request
        sample = call(self.client, self.url + path, self.body(kind, stream))
        cpu1 = self.proc.cpu_seconds()
        if cpu0 is not None and cpu1 is not None:
            sample.cpu_seconds = cpu1 - cpu0
        return sample

    def close(self) -> None:
        self.client.close()
        self.proc.stop()


def start_ours(s: Settings, log_dir: Path, data_dir: Path) -> HTTPSystem:
    # Exactly these settings: any ML_OFFLOAD_* in the caller's environment is dropped.
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("ML_OFFLOAD_")}
    port = free_port()
    env.update({
        "ML_OFFLOAD_BACKEND": "llamacpp",  # in-process, as before managed mode (engines.py)
        "ML_OFFLOAD_DATA_DIR": str(data_dir),
        "ML_OFFLOAD_DEFAULT_MODEL": str(s.model),
        "ML_OFFLOAD_N_CTX": str(s.n_ctx),
        "ML_OFFLOAD_THREADS": str(s.threads),
        "ML_OFFLOAD_N_GPU_LAYERS": str(s.n_gpu_layers),
        "ML_OFFLOAD_PORT": str(port),
        "ML_OFFLOAD_KEEP_ALIVE": "-1",
        "ML_OFFLOAD_LOG_LEVEL": "warning",
        "PYTHONUNBUFFERED": "1",
    })
    cmd = [sys.executable, "-m", "mloffload.server"]
    sysm = HTTPSystem(s, "ours", cmd, log_dir, env=env, port=port)
    sysm.version = package_version("ml-offload")
    sysm.description = (
        "python -m mloffload.server (FastAPI/uvicorn, llama.cpp in-process); env "
        f"ML_OFFLOAD_BACKEND=llamacpp ML_OFFLOAD_N_CTX={s.n_ctx} ML_OFFLOAD_THREADS={s.threads} "
        f"ML_OFFLOAD_N_GPU_LAYERS={s.n_gpu_layers} ML_OFFLOAD_DEFAULT_MODEL=<model>")
    return sysm


def start_llama_cpp_server(s: Settings, log_dir: Path) -> HTTPSystem:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(s.model),
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(s.n_ctx),
           "--n_batch", str(s.n_batch), "--n_threads", str(s.threads),
           "--n_threads_batch", str(s.threads), "--n_gpu_layers", str(s.n_gpu_layers),
           "--chat_format", "gemma", "--flash_attn", "true", "--verbose", "False"]
    sysm = HTTPSystem(s, "llama_cpp_server", cmd, log_dir, port=port)
    sysm.ready_path = "/v1/models"
    sysm.version = package_version("llama_cpp_python")
    sysm.description = ("python -m llama_cpp.server (llama-cpp-python[server], "
                        "sse-starlette), same Llama arguments as raw")
    return sysm


def start_llama_server(s: Settings, log_dir: Path, binary: str) -> HTTPSystem:
    port = free_port()
    cmd = [binary, "-m", str(s.model), "--host", "127.0.0.1", "--port", str(port),
           "-c", str(s.n_ctx), "-b", str(s.n_batch), "-t", str(s.threads),
           "-tb", str(s.threads), "-ngl", str(s.n_gpu_layers), "-np", "1",
           # With Jinja on (the default) "gemma" would be taken as the template's own text
           # and every chat would render as the literal word; --no-jinja picks the built-in.
           "--no-jinja", "--chat-template", "gemma", "--no-webui"]
    sysm = HTTPSystem(s, "llama_server", cmd, log_dir, port=port)
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
        sysm.version = next((ln for ln in (out.stdout + out.stderr).splitlines()
                             if ln.startswith("version")), None)
    except (OSError, subprocess.SubprocessError):
        sysm.version = None
    sysm.description = ("llama.cpp's own llama-server (C++), built from the pinned "
                        "llama-cpp-python sdist by python/mloffload/engine/build.py; 1 slot")
    return sysm


def find_llama_server(explicit: str | None) -> str | None:
    for cand in (explicit, os.environ.get("ML_OFFLOAD_LLAMA_SERVER_BIN")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ml-offload"
    found = sorted(cache.glob("llama-server-*/bin/llama-server"))
    if found:
        return str(found[-1])
    return shutil.which("llama-server")


# --- the run ------------------------------------------------------------------------------


def rotated(items: Sequence[str], k: int) -> list[str]:
    k %= len(items)
    return [*items[k:], *items[:k]]


def summarise(samples: list[dict[str, Any]], cases: Sequence[str], systems: Sequence[str],
              max_tokens: int) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for case in cases:
        _, stream = case_parts(case)
        out[case] = {}
        for name in systems:
            rows = [r for r in samples if r["case"] == case and r["system"] == name
                    and not r["warmup"] and r["ok"]]
            if not rows:
                continue
            ttft = [r["ttft_s"] for r in rows]
            toks = [r["tokens"] for r in rows]
            cpu = [r["cpu_s"] / r["tokens"] * 1000 if r["cpu_s"] is not None and r["tokens"]
                   else None for r in rows]
            entry: dict[str, Any] = {
                "n": len(rows),
                "tokens": median(toks),
                "tokens_min": min(toks),
                "tokens_max": max(toks),
                "token_basis": sorted({r["token_basis"] for r in rows}),
                "latency_ms": _ms(median([r["total_s"] for r in rows])),
                "e2e_tps": median([r["e2e_tps"] for r in rows]),
                "cpu_ms_per_token": median(cpu),
            }
            if stream:
                dec = [r["decode_tps"] for r in rows]
                entry.update({
                    "ttft_ms": _ms(median(ttft)),
                    "ttft_ms_p10": _ms(percentile(ttft, 10)),
                    "ttft_ms_p90": _ms(percentile(ttft, 90)),
                    "decode_tps": median(dec),
                    "decode_tps_p10": percentile(dec, 10),
                    "decode_tps_p90": percentile(dec, 90),
                })
            out[case][name] = entry
    return out


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1000.0


def headline(case: str, entry: Mapping[str, Any]) -> float | None:
    """The tokens/s figure compared across systems: decode for streams, end to end else."""
    _, stream = case_parts(case)
    value = entry.get("decode_tps" if stream else "e2e_tps")
    return None if value is None else float(value)


def compare(summary: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for case, by_sys in summary.items():
        _, stream = case_parts(case)
        ours = by_sys.get("ours")
        if ours is None:
            continue
        row: dict[str, Any] = {}
        for ref in ("raw", "raw_generate", "llama_cpp_server", "llama_server"):
            if ref in by_sys:
                row[f"tps_vs_{ref}"] = ratio(headline(case, ours), headline(case, by_sys[ref]))
                key = "ttft_ms" if stream else "latency_ms"
                if ours.get(key) is not None and by_sys[ref].get(key) is not None:
                    row[f"{key}_overhead_vs_{ref}"] = ours[key] - by_sys[ref][key]
        out[case] = row
    return out


def targets(ratios: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    checks = []
    for case, row in ratios.items():
        _, stream = case_parts(case)
        metric = "decode tok/s" if stream else "end-to-end tok/s"
        if (v := row.get("tps_vs_raw")) is not None:
            checks.append({"case": case, "target": f"{metric} ≥ {TARGET_TPS_VS_RAW}× raw",
                           "value": round(v, 3), "pass": v >= TARGET_TPS_VS_RAW})
        if stream and (v := row.get("ttft_ms_overhead_vs_raw")) is not None:
            checks.append({"case": case,
                           "target": f"TTFT overhead vs raw ≤ {TARGET_TTFT_OVERHEAD_MS:g} ms",
                           "value": round(v, 2), "pass": v <= TARGET_TTFT_OVERHEAD_MS})
        if (v := row.get("tps_vs_llama_cpp_server")) is not None:
            checks.append({"case": case,
                           "target": f"{metric} ≥ {TARGET_VS_LLAMA_CPP_SERVER}× llama_cpp.server",
                           "value": round(v, 3), "pass": v >= TARGET_VS_LLAMA_CPP_SERVER})
    return checks


def consistency(samples: list[dict[str, Any]], cases: Sequence[str]) -> dict[str, Any]:
    """Did every system generate as many tokens, and the same text, as raw did?"""
    out: dict[str, Any] = {}
    for case in cases:
        rows = [r for r in samples if r["case"] == case and r["ok"]]
        counts = {r["system"]: r["tokens"] for r in rows}
        texts: dict[str, set[str]] = {}
        for r in rows:
            texts.setdefault(r["system"], set()).add(r["text"])
        raw_texts = texts.get("raw", set())
        out[case] = {
            "tokens_by_system": counts,
            "same_token_count": len(set(counts.values())) <= 1,
            "text_matches_raw": {k: v == raw_texts for k, v in texts.items() if k != "raw"}
            if raw_texts else {},
            "deterministic": {k: len(v) == 1 for k, v in texts.items()},
            "texts": {k: sorted(v) for k, v in texts.items()},
        }
    return out


def compact(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Samples for the JSON: each text as a short hash (the texts are in "consistency")."""
    out = []
    for r in samples:
        r = dict(r)
        text = r.pop("text")
        r["text_sha1"] = hashlib.sha1(text.encode()).hexdigest()[:12]
        r["text_chars"] = len(text)
        out.append(r)
    return out


def run(args: argparse.Namespace) -> int:
    from mloffload.config import default_data_dir
    from mloffload.models.catalog import ensure_embedded_model

    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    model = Path(args.model).expanduser() if args.model else ensure_embedded_model(data_dir)
    s = Settings(model=model.resolve(), n_ctx=args.n_ctx, threads=args.threads,
                 n_gpu_layers=args.n_gpu_layers, max_tokens=args.max_tokens, seed=args.seed,
                 completion_prompt=args.prompt, chat_prompt=args.chat_prompt)
    systems_wanted = [x for x in args.systems.split(",") if x]
    cases = [x for x in args.cases.split(",") if x]
    for x in systems_wanted:
        if x not in SYSTEMS:
            raise SystemExit(f"unknown system {x!r}; choose from {', '.join(SYSTEMS)}")
    for x in cases:
        if x not in CASES:
            raise SystemExit(f"unknown case {x!r}; choose from {', '.join(CASES)}")
    out_dir = Path(args.out)
    machine = machine_info()
    print(f"server benchmark: model {s.model.name}, {len(systems_wanted)} systems, "
          f"{len(cases)} cases, {args.warmup} warm-up + {args.reps} reps, "
          f"threads={s.threads}, n_ctx={s.n_ctx}, max_tokens={s.max_tokens}; "
          f"load average {machine['loadavg_at_start']}", flush=True)

    notes: list[str] = []
    systems: dict[str, System] = {}
    ready_s: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mlo-bench-")))
        log_dir = Path(args.log_dir) if args.log_dir else work / "logs"
        starting: list[HTTPSystem] = []
        if "ours" in systems_wanted:
            starting.append(start_ours(s, log_dir, work / "data"))
        if "llama_cpp_server" in systems_wanted:
            try:
                import llama_cpp.server  # noqa: F401
            except ImportError as exc:
                notes.append(f"llama_cpp.server skipped: {exc} "
                             f"(pip install 'llama-cpp-python[server]=={pinned_version()}')")
            else:
                starting.append(start_llama_cpp_server(s, log_dir))
        if "llama_server" in systems_wanted:
            binary = find_llama_server(args.llama_server_bin)
            if binary is None:
                notes.append("llama-server skipped: no binary (./dev build "
                             "or ML_OFFLOAD_LLAMA_SERVER_BIN)")
            else:
                starting.append(start_llama_server(s, log_dir, binary))
        for proc in starting:
            stack.callback(proc.close)
        if "raw" in systems_wanted:
            raw = RawSystem(s)
            stack.callback(raw.close)
            systems["raw"] = raw
        if "raw_generate" in systems_wanted:
            floor = RawGenerateSystem(s)
            stack.callback(floor.close)
            systems["raw_generate"] = floor
        for proc in starting:
            ready_s[proc.name] = proc.wait_ready()
            systems[proc.name] = proc
        order = [n for n in SYSTEMS if n in systems]
        for n in order:
            print(f"  {n}: {systems[n].description}", flush=True)

        samples: list[dict[str, Any]] = []
        started = time.monotonic()
        for rep in range(-args.warmup, args.reps):
            warm = rep < 0
            for case in cases:
                for name in rotated(order, rep + args.warmup):
                    sample = systems[name].run(case)
                    samples.append(_record(sample, name, case, rep, warm, s.max_tokens))
                    if not sample.ok:
                        print(f"  ! {name} {case}: {sample.status} {sample.error}", flush=True)
            if not warm:
                print(f"  rep {rep + 1}/{args.reps} done ({time.monotonic() - started:.0f}s, "
                      f"load {loadavg()})", flush=True)
        bench_seconds = time.monotonic() - started

    summary = summarise(samples, cases, order, s.max_tokens)
    ratios = compare(summary)
    checks = targets(ratios)
    consistent = consistency([r for r in samples if not r["warmup"]], cases)
    for case, c in consistent.items():
        if not c["same_token_count"]:
            notes.append(f"{case}: systems generated different token counts "
                         f"{c['tokens_by_system']}; tokens/s are over what each generated")
    load_end = loadavg()
    busy = (machine["loadavg_at_start"] or [0.0])[0] > 0.5 * (machine["cpus_usable"] or 1)
    if busy:
        notes.append(f"the machine was busy before the run (load average "
                     f"{machine['loadavg_at_start']} on {machine['cpus_usable']} CPUs): "
                     "absolute numbers are low and ratios noisy; rerun on a quiet machine")
    notes.extend(args.note or [])
    result = {
        "benchmark": "server",
        "date": now_iso(),
        "command": command_line(),
        "git_commit": git_commit(),
        "machine": {**machine, "loadavg_at_end": load_end},
        "versions": {"llama_cpp_python": package_version("llama_cpp_python"),
                     "ml_offload": package_version("ml-offload"),
                     "fastapi": package_version("fastapi"),
                     "starlette": package_version("starlette"),
                     "uvicorn": package_version("uvicorn"),
                     "sse_starlette": package_version("sse-starlette"),
                     "httpx": package_version("httpx")},
        "settings": {"model": str(s.model), "model_bytes": s.model.stat().st_size,
                     "n_ctx": s.n_ctx, "n_batch": s.n_batch, "threads": s.threads,
                     "n_gpu_layers": s.n_gpu_layers, "sampling": s.sampling(),
                     "completion_prompt": s.completion_prompt, "chat_prompt": s.chat_prompt,
                     "reps": args.reps, "warmup": args.warmup, "order": "rotated per rep"},
        "systems": {n: {"label": LABELS[n], "description": systems[n].description,
                        "version": systems[n].version, "command": systems[n].command,
                        "ready_seconds": ready_s.get(n)} for n in order},
        "bench_seconds": round(bench_seconds, 1),
        "summary": summary,
        "ratios": ratios,
        "targets": checks,
        "consistency": consistent,
        "notes": notes,
        "samples": compact(samples),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    name = args.name
    write_json(out_dir / f"{name}.json", result)
    (out_dir / f"{name}.md").write_text(markdown(result))
    if not args.no_chart:
        try:
            chart(result, out_dir / f"{name}.png")
        except ImportError as exc:
            print(f"  no chart: {exc} (pip install matplotlib)", flush=True)
    print(markdown_tables(result))
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {out_dir / name}.json, .md{'' if args.no_chart else ', .png'}")
    failed = [r for r in samples if not r["ok"]]
    return 1 if failed else 0


def _record(sample: Sample, name: str, case: str, rep: int, warm: bool,
            max_tokens: int) -> dict[str, Any]:
    _, stream = case_parts(case)
    tokens, basis = sample.tokens(max_tokens)
    return {
        "system": name, "case": case, "rep": rep, "warmup": warm, "ok": sample.ok,
        "status": sample.status, "error": sample.error or None,
        "ttft_s": sample.first_content if stream else sample.total,
        "total_s": sample.total, "last_content_s": sample.last_content,
        "content_events": sample.content_events, "tokens": tokens, "token_basis": basis,
        "prompt_tokens": sample.prompt_tokens, "finish_reason": sample.finish_reason,
        "decode_tps": sample.decode_tps(max_tokens) if stream else None,
        "e2e_tps": sample.e2e_tps(max_tokens), "cpu_s": sample.cpu_seconds,
        "loadavg": loadavg(), "text": sample.text,
    }


# --- reporting -------------------------------------------------------------------------------


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


_TABLES = (
    # title, streamed?, time column (key, header), speed column (key, header)
    ("### Streamed (SSE; raw: the Python iterator)", True, ("ttft_ms", "TTFT ms"),
     ("decode_tps", "decode tok/s (p10–p90)")),
    ("### Not streamed (one JSON answer)", False, ("latency_ms", "latency ms"),
     ("e2e_tps", "tok/s end to end")),
)


def markdown_tables(result: Mapping[str, Any]) -> str:
    summary = result["summary"]
    parts = []
    for title, streamed, (tkey, theader), (skey, sheader) in _TABLES:
        rows = []
        for case in [c for c in summary if case_parts(c)[1] == streamed]:
            by = summary[case]
            refs = [by.get("raw"), by.get("raw_generate"), by.get("llama_cpp_server")]
            raw = refs[0]
            for n, e in by.items():
                over = None if raw is None or e[tkey] is None or raw[tkey] is None \
                    else e[tkey] - raw[tkey]
                speed = fmt(e[skey], 1)
                if streamed:
                    speed += f" ({fmt(e['decode_tps_p10'], 0)}–{fmt(e['decode_tps_p90'], 0)})"
                rows.append([case, LABELS[n], fmt(e["tokens"], 0), fmt(e[tkey], 1),
                             "–" if n == "raw" else fmt(over, 1), speed,
                             *[_x(ratio(e[skey], r[skey]) if r else None) for r in refs],
                             fmt(e["cpu_ms_per_token"], 1)])
        if rows:
            parts.append(title + "\n\n" + md_table(
                ["request", "system", "tokens", theader, theader.replace(" ms", "") +
                 " − raw ms", sheader, "× raw", "× raw generate", "× llama_cpp.server",
                 "CPU ms/token"], rows, ["l", "l"] + ["r"] * 8))
    if result["targets"]:
        rows = [[t["case"], t["target"], str(t["value"]), "pass" if t["pass"] else "**FAIL**"]
                for t in result["targets"]]
        parts.append("### Targets (issue 2)\n\n" + md_table(
            ["request", "target", "measured", ""], rows, ["l", "l", "r", "l"]))
    return "\n\n".join(parts)


def markdown(result: Mapping[str, Any]) -> str:
    m = result["machine"]
    st = result["settings"]
    cpu = m["cpu"]
    lines = [
        "# Server benchmark",
        "",
        "Decode tokens/s and time to first token through the ml-offload server, raw "
        "llama-cpp-python in-process, llama-cpp-python's own server and llama.cpp's "
        "llama-server: one run, same model, prompts and settings, systems interleaved "
        "request by request (starting system rotated each repetition), medians of "
        f"{st['reps']} repetitions after {st['warmup']} warm-up. Generated by "
        "`bench/server.py`; every sample is in `server.json`.",
        "",
        f"- **Date**: {result['date']} — commit `{result['git_commit']}`",
        f"- **Command**: `{result['command']}`",
        f"- **Machine**: {cpu['model']}, {m['cpus_usable']} usable CPUs "
        f"({cpu.get('physical_cores')} cores, {cpu['logical_cpus']} logical; "
        f"{', '.join(cpu.get('simd') or [])}), {m['memory_gib']} GiB, {m['os']}, "
        f"Python {m['python']}; load average {m['loadavg_at_start']} at start, "
        f"{m['loadavg_at_end']} at end",
        f"- **Versions**: llama-cpp-python {result['versions']['llama_cpp_python']}, "
        f"FastAPI {result['versions']['fastapi']}, uvicorn {result['versions']['uvicorn']}, "
        f"sse-starlette {result['versions']['sse_starlette']}",
        f"- **Model**: `{Path(st['model']).name}` ({st['model_bytes'] / 1e6:.0f} MB); "
        f"n_ctx {st['n_ctx']}, n_batch {st['n_batch']}, llama.cpp threads {st['threads']}, "
        f"n_gpu_layers {st['n_gpu_layers']}",
        f"- **Sampling**: {st['sampling']}",
        f"- **Prompts**: completion {st['completion_prompt']!r}; chat (one user message, "
        f"Gemma turn format) {st['chat_prompt']!r}",
        "",
    ]
    if result["notes"]:
        lines += ["> **Notes**", ">"] + [f"> - {n}" for n in result["notes"]] + [""]
    lines += [markdown_tables(result), "", "### Definitions", "",
              "- *TTFT*: send → first event carrying non-empty text (streams); the whole "
              "request for non-streamed ones.",
              "- *decode tok/s*: (tokens − 1) / (last text event − first text event).",
              "- *tok/s end to end*: tokens / whole request (prompt processing included).",
              "- *CPU ms/token*: CPU time of the serving process (all threads) per generated "
              "token; for raw, of the benchmark process during the call.",
              "- *tokens*: the server's usage where it sends one, else max_tokens when "
              "finish_reason is \"length\", else one per text event (see `token_basis`).",
              "", "### Systems", ""]
    for info in result["systems"].values():
        cmd = f" — `{' '.join(info['command'])}`" if info["command"] else ""
        lines.append(f"- **{info['label']}** ({info['version']}): {info['description']}{cmd}")
    cons = result["consistency"]
    lines += ["", "### Same work?", ""]
    for case, c in cons.items():
        lines.append(f"- {case}: tokens {c['tokens_by_system']}; text identical to raw: "
                     f"{c['text_matches_raw'] or '–'}")
    return "\n".join(lines) + "\n"


def chart(result: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    cases = list(summary)
    names = [n for n in SYSTEMS if any(n in summary[c] for c in cases)]
    stream_cases = [c for c in cases if case_parts(c)[1]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8),
                             gridspec_kw={"width_ratios": [max(len(cases), 1),
                                                           max(len(stream_cases), 1)]})
    width = 0.8 / max(len(names), 1)
    colors = {"ours": "#2b7bba", "raw": "#7f7f7f", "raw_generate": "#bdbdbd",
              "llama_cpp_server": "#e07b39",
              "llama_server": "#5aa469"}
    ax = axes[0]
    for i, n in enumerate(names):
        vals = [headline(c, summary[c][n]) if n in summary[c] else 0.0 for c in cases]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(cases))]
        bars = ax.bar(xs, [v or 0.0 for v in vals], width, label=LABELS[n], color=colors[n])
        if n == "ours":
            for b, c in zip(bars, cases, strict=True):
                r = result["ratios"].get(c, {}).get("tps_vs_raw")
                if r is not None:
                    ax.annotate(f"{r:.2f}×", (b.get_x() + b.get_width() / 2, b.get_height()),
                                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([c + ("\n(decode)" if case_parts(c)[1] else "\n(end to end)")
                        for c in cases], fontsize=8)
    ax.set_ylabel("tokens/s (median)")
    ax.set_title("Generation speed (label on ours: × raw)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.25)
    ax.legend(fontsize=8, loc="upper right", ncols=2)
    ax = axes[1]
    for i, n in enumerate(names):
        vals = [summary[c][n]["ttft_ms"] if n in summary[c] else 0.0 for c in stream_cases]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(stream_cases))]
        ax.bar(xs, [v or 0.0 for v in vals], width, label=LABELS[n], color=colors[n])
    ax.set_xticks(range(len(stream_cases)))
    ax.set_xticklabels(stream_cases, fontsize=8)
    ax.set_ylabel("ms (median)")
    ax.set_title("Time to first token (streamed)")
    m = result["machine"]
    threads = result["settings"]["threads"]
    fig.suptitle(f"{Path(result['settings']['model']).name}, {threads} llama.cpp "
                 f"thread{'s' if threads != 1 else ''}, {m['cpu']['model']} "
                 f"({m['cpus_usable']} CPUs), "
                 f"{result['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- entry point -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/server.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per system and case")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="llama.cpp threads (generation and batch) for every system; default: "
                   "the server's own default, half the logical CPUs")
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--seed", type=int, default=None,
                   help="send this seed (a seeded request evaluates its whole prompt afresh "
                   "in ml-offload, by its seed rule; greedy decoding needs none)")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--model", help="a .gguf file (default: the embedded Gemma 3 270M)")
    p.add_argument("--data-dir", help="where the embedded model is assembled "
                   "(default: the server's data dir)")
    p.add_argument("--prompt", default=COMPLETION_PROMPT, help="completion prompt")
    p.add_argument("--chat-prompt", default=CHAT_PROMPT, help="the chat's user message")
    p.add_argument("--llama-server-bin", help="llama-server binary "
                   "(default: $ML_OFFLOAD_LLAMA_SERVER_BIN, then ~/.cache/ml-offload)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="results folder")
    p.add_argument("--name", default="server", help="basename of the result files")
    p.add_argument("--log-dir", help="keep the servers' logs here (default: a temp dir)")
    p.add_argument("--note", action="append", help="a note to print with the results")
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--quick", action="store_true", help="1 warm-up + 2 reps (a smoke test)")
    p.add_argument("--render", metavar="JSON",
                   help="only rewrite the .md and .png from an earlier run's JSON")
    args = parse_shared_args(p, argv, "server")
    if args.quick:
        args.reps, args.warmup = 2, 1
    return args


def render(path: Path, no_chart: bool) -> int:
    result = json.loads(path.read_text())
    path.with_suffix(".md").write_text(markdown(result))
    if not no_chart:
        chart(result, path.with_suffix(".png"))
    print(f"rewrote {path.with_suffix('.md')}{'' if no_chart else ' and .png'}")
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.render:
        return render(Path(args.render), args.no_chart)
    return run(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

