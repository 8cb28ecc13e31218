"""The Neovim plugin's costs, measured on a real headless Neovim (issues 6 and 7).

1. Startup: ``nvim --headless +qa`` with the plugin (runtimepath, registered remote plugin,
   ``setup()``) against the same editor without it; wall time per run, interleaved.
   Target: at most 5 ms added.
2. Responsiveness: the round trip of an RPC request (``nvim_eval("1")``) from a second
   client, idle and while a chat streams into its buffer. Target: p99 while streaming at most
   2x idle.
3. First answer: from ``:MLChat`` to the first answer text on the server path (warm
   server) and on the in-process fallback (server down: host start, model load, first
   token), in fresh editors.

Writes ``bench/results/nvim.json`` and ``bench/results/nvim.md``.

    python bench/nvim.py [--startup-runs 30] [--rpc-samples 300] [--first-answer-runs 2]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests")]

from common import (  # noqa: E402
    RESULTS_DIR,
    ManagedProcess,
    command_line,
    fmt,
    free_port,
    machine_info,
    md_table,
    median,
    now_iso,
    parse_shared_args,
    percentile,
    write_json,
)
from nvim_harness import REPO, Editor, editor_env, nvim_binary, register_plugin  # noqa: E402

LOADED = re.compile(r"model loaded in ([\d.]+) s")
HEADING = " (ml-offload)\n"


def answer_so_far(ed: Editor) -> str:
    """The text of the newest chat's last answer so far ("" before its heading)."""
    chats = ed.chats()
    if not chats:
        return ""
    text = "\n".join(max(chats, key=lambda c: c["buf"])["lines"])
    if HEADING not in text:
        return ""
    return text.rsplit(HEADING, 1)[1].split("\n\n## You", 1)[0].strip()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


# --- 1. startup ---------------------------------------------------------------------------


def startup(home: Path, manifest: Path, runs: int) -> dict[str, Any]:
    empty = home / "empty-manifest.vim"
    empty.write_text("")
    base = [nvim_binary(), "--headless", "-u", "NORC", "-i", "NONE", "-n",
            "--cmd", f"let g:python3_host_prog = '{sys.executable}'"]
    without = ([*base, "+qa"], editor_env(home / "without", empty))
    with_plugin = ([*base, "--cmd", f"set runtimepath^={REPO}",
                    "-c", "lua require('ml-offload').setup({})", "+qa"],
                   editor_env(home / "with", manifest))
    times: dict[str, list[float]] = {"without": [], "with": []}
    for i in range(runs + 2):  # two warm-up rounds fill the page cache
        for name, (argv, env) in (("without", without), ("with", with_plugin)):
            start = time.perf_counter()
            subprocess.run(argv, env=env, check=True, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    own = plugin_startuptime(with_plugin[0], with_plugin[1], home / "startuptime.log",
                             manifest, min(runs, 10))
    med_with, med_without = median(times["with"]), median(times["without"])
    added = None if med_with is None or med_without is None else med_with - med_without
    return {
        "runs": runs,
        "without_ms": {"median": _ms(med_without), "p90": _ms(percentile(times["without"], 90))},
        "with_ms": {"median": _ms(med_with), "p90": _ms(percentile(times["with"], 90))},
        "added_ms": _ms(added),
        "plugin_files_ms": own,
        "target_added_ms": 5.0,
    }


def plugin_startuptime(argv: Sequence[str], env: dict[str, str], log: Path,
                       manifest: Path, runs: int) -> dict[str, float | None]:
    """From ``--startuptime`` (median of ``runs``), in ms: self time of
    plugin/ml-offload.lua, of the remote plugin manifest, and the ``-c`` commands that run
    ``setup()`` (from "editing files in windows" to "NVIM STARTED")."""
    plugin_file = str(REPO / "plugin" / "ml-offload.lua")
    rows: dict[str, list[float | None]] = {"plugin_file": [], "manifest": [], "setup": []}
    for _ in range(runs):
        log.unlink(missing_ok=True)
        subprocess.run([*argv[:1], "--startuptime", str(log), *argv[1:]], env=env, check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)
        found = {"plugin_file": 0.0, "manifest": 0.0}
        clock: dict[str, float] = {}
        for line in log.read_text().splitlines():
            parts = line.split()
            if len(parts) < 2 or not re.fullmatch(r"[\d.]+", parts[0]):
                continue
            if line.rstrip().endswith(plugin_file) and len(parts) >= 4:
                found["plugin_file"] += float(parts[2].rstrip(":"))  # clock, total, self:
            elif line.rstrip().endswith(str(manifest)) and len(parts) >= 4:
                found["manifest"] += float(parts[2].rstrip(":"))
            elif "editing files in windows" in line:
                clock["edit"] = float(parts[0])
            elif "NVIM STARTED" in line:
                clock["started"] = float(parts[0])
        rows["plugin_file"].append(found["plugin_file"])
        rows["manifest"].append(found["manifest"])
        if "edit" in clock and "started" in clock:
            rows["setup"].append(clock["started"] - clock["edit"])
    out: dict[str, float | None] = {}
    for key, values in rows.items():
        value = median(values)
        out[key] = None if value is None else round(value, 3)
    return out


# --- 2. RPC round trip ----------------------------------------------------------------------


def rpc_samples(ed: Editor, count: int, while_: Callable[[], bool] | None = None) -> list[float]:
    out: list[float] = []
    for i in range(count):
        if while_ is not None and i % 20 == 0 and not while_():
            break
        start = time.perf_counter()
        ed.nvim.eval("1")
        out.append(time.perf_counter() - start)
        time.sleep(0.005)
    return out


def finished_count(ed: Editor) -> int:
    return int(ed.lua("return #vim.tbl_filter(function(e) return e[1] == "
                      "'MLOffloadRequestFinished' end, _G.ml_test_events)"))


def stream_elsewhere(url: str, max_tokens: int, done: threading.Event) -> threading.Thread:
    """The control: the server streams the same kind of answer to another HTTP client."""

    def run() -> None:
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", timeout=600, json={
                    "model": "default", "stream": True, "max_tokens": max_tokens,
                    "temperature": 0.8, "seed": 3, "messages": [
                        {"role": "user", "content": "Write a long story about a lighthouse"}]},
                    ) as resp:
                for _ in resp.iter_lines():
                    pass
        finally:
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def rpc(home: Path, manifest: Path, url: str, samples: int, max_tokens: int) -> dict[str, Any]:
    ed = Editor(home / "rpc", manifest, setup={"api_url": url, "params": {
        "temperature": 0.8, "seed": 3, "max_tokens": max_tokens}})
    try:
        # Warm up: the Python host, the plugin, and the model on the server.
        ed.nvim.command("MLChat hi")
        ed.wait(lambda: finished_count(ed) >= 1, timeout=300, what="the warm-up chat")
        ed.nvim.command("close")
        idle = rpc_samples(ed, samples)
        done = threading.Event()
        stream_elsewhere(url, max_tokens, done).join(0.5)  # let it start generating
        control = rpc_samples(ed, samples, while_=lambda: not done.is_set())
        done.wait(600)
        ed.nvim.command("MLChat Write a long story about a lighthouse keeper")
        ed.wait(lambda: len(ed.chats()) == 2 and answer_so_far(ed), timeout=300,
                what="streaming to start")
        streaming = rpc_samples(ed, samples, while_=lambda: finished_count(ed) < 2)
        still = finished_count(ed) < 2
        ed.wait(lambda: finished_count(ed) >= 2, timeout=600, what="the chat to end")
    finally:
        ed.close()
    p99_idle, p99_stream = percentile(idle, 99), percentile(streaming, 99)
    return {
        "samples_idle": len(idle),
        "samples_server_busy": len(control),
        "samples_streaming": len(streaming),
        "stream_outlived_sampling": still,
        "idle_ms": {"p50": _ms(percentile(idle, 50)), "p99": _ms(p99_idle)},
        "server_busy_ms": {"p50": _ms(percentile(control, 50)),
                           "p99": _ms(percentile(control, 99))},
        "streaming_ms": {"p50": _ms(percentile(streaming, 50)), "p99": _ms(p99_stream)},
        "p99_ratio": None if not p99_idle or p99_stream is None else p99_stream / p99_idle,
        "target_p99_ratio": 2.0,
    }


# --- 3. first answer --------------------------------------------------------------------------


def first_answer(home: Path, manifest: Path, url: str, data_dir: Path) -> dict[str, Any]:
    """One fresh editor: seconds from :MLChat to the float, to the first answer text."""
    ed = Editor(home, manifest, env={"ML_OFFLOAD_DATA_DIR": str(data_dir)},
                setup={"api_url": url, "params": {"temperature": 0, "seed": 1,
                                                  "max_tokens": 8}})
    try:
        start = time.perf_counter()
        ed.nvim.command("MLChat hello")
        marks: dict[str, float] = {}
        load_s = None
        while time.perf_counter() - start < 600:
            if ed.chats():
                marks.setdefault("float", time.perf_counter() - start)
                if answer_so_far(ed):
                    marks["first_text"] = time.perf_counter() - start
                    break
            time.sleep(0.01)
        ed.wait(lambda: finished_count(ed) >= 1, timeout=600, what="the answer")
        m = LOADED.search(answer_so_far(ed))
        load_s = float(m.group(1)) if m else None
        title = ed.chat()["wins"][0]["title"].strip()
    finally:
        ed.close()
    return {"float_s": marks.get("float"), "first_text_s": marks.get("first_text"),
            "model_load_s": load_s, "title": title}


def first_answers(home: Path, manifest: Path, server_url: str, data_dir: Path,
                  runs: int) -> dict[str, Any]:
    down = f"http://127.0.0.1:{free_port()}"
    server = [first_answer(home / f"server{i}", manifest, server_url, data_dir)
              for i in range(runs)]
    local = [first_answer(home / f"fallback{i}", manifest, down, data_dir)
             for i in range(runs)]

    def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"runs": rows,
                "first_text_s_median": median([r["first_text_s"] for r in rows]),
                "model_load_s_median": median([r["model_load_s"] for r in rows])}

    return {"server": summary(server), "fallback": summary(local)}


# --- report ---------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    s, r, f = result["startup"], result["rpc"], result["first_answer"]
    m = result["machine"]
    lines = [
        "# Neovim plugin benchmark", "",
        f"{result['date']} · `{result['command']}` · {m['cpu'].get('model')}, "
        f"{m['cpus_usable']} CPUs usable, load {m['loadavg_at_start']} · Neovim "
        f"{result['nvim']} · server threads {result['server_threads']}", "",
        "## Startup (`nvim --headless +qa`)", "",
        md_table(["", "median ms", "p90 ms"], [
            ["without the plugin", fmt(s["without_ms"]["median"]), fmt(s["without_ms"]["p90"])],
            ["with the plugin", fmt(s["with_ms"]["median"]), fmt(s["with_ms"]["p90"])],
        ], ["l", "r", "r"]), "",
        f"Added: **{fmt(s['added_ms'], 2)} ms** (target ≤ {s['target_added_ms']:g} ms; "
        f"{s['runs']} runs each, interleaved). `--startuptime` (median): "
        f"plugin/ml-offload.lua {fmt(s['plugin_files_ms']['plugin_file'], 3)} ms, the remote "
        f"plugin manifest {fmt(s['plugin_files_ms']['manifest'], 3)} ms, `setup()` "
        f"{fmt(s['plugin_files_ms']['setup'], 3)} ms.", "",
        "## RPC round trip (`nvim_eval(\"1\")` from a second client)", "",
        md_table(["", "samples", "p50 ms", "p99 ms"], [
            ["idle", str(r["samples_idle"]), fmt(r["idle_ms"]["p50"], 3),
             fmt(r["idle_ms"]["p99"], 3)],
            ["control: the server streams to another client", str(r["samples_server_busy"]),
             fmt(r["server_busy_ms"]["p50"], 3), fmt(r["server_busy_ms"]["p99"], 3)],
            ["while a chat streams into its buffer", str(r["samples_streaming"]),
             fmt(r["streaming_ms"]["p50"], 3), fmt(r["streaming_ms"]["p99"], 3)],
        ], ["l", "r", "r", "r"]), "",
        f"p99 streaming / idle: **{fmt(r['p99_ratio'], 2)}×** (target ≤ "
        f"{r['target_p99_ratio']:g}×). The control row is the same generation without the "
        "plugin: what it adds over idle is the machine's CPU contention, not the plugin.", "",
        "## First answer after `:MLChat` (fresh editor)", "",
        md_table(["path", "model load s", "first text s (median)"], [
            ["server (warm)", "–", fmt(f["server"]["first_text_s_median"], 2)],
            ["in-process fallback (server down)", fmt(f["fallback"]["model_load_s_median"], 2),
             fmt(f["fallback"]["first_text_s_median"], 2)],
        ], ["l", "r", "r"]), "",
        "Both include starting the Python host; the fallback adds the model load.", "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/nvim.py", description=__doc__.split("\n")[0])
    parser.add_argument("--startup-runs", type=int, default=30)
    parser.add_argument("--rpc-samples", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=400,
                        help="length of the chat streamed during the RPC samples")
    parser.add_argument("--first-answer-runs", type=int, default=2)
    parser.add_argument("--server-threads", type=int,
                        default=max(1, (os.cpu_count() or 2) - 1),
                        help="llama.cpp threads of the server (default: all CPUs but one, "
                             "leaving one for the editor)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="ml-offload data dir with the default model (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    argv = sys.argv[1:] if argv is None else argv
    args = parse_shared_args(parser, argv, "nvim")

    from mloffload.models.catalog import ensure_embedded_model

    with tempfile.TemporaryDirectory(prefix="ml-offload-bench-nvim-") as tmp:
        home = Path(tmp)
        data_dir = args.data_dir or Path(os.environ.get("ML_OFFLOAD_DATA_DIR") or home / "data")
        ensure_embedded_model(data_dir)
        manifest = register_plugin(home / "register")
        machine = machine_info()
        print("startup ...", file=sys.stderr)
        startup_result = startup(home, manifest, args.startup_runs)
        port = free_port()
        server = ManagedProcess(
            "server", [sys.executable, "-m", "mloffload.server", "--port", str(port),
                       "--threads", str(args.server_threads), "--n-ctx", "2048"],
            url=f"http://127.0.0.1:{port}", log_dir=home / "logs",
            env={"ML_OFFLOAD_DATA_DIR": str(data_dir)})
        try:
            server.wait_ready("/health")
            print("rpc round trips ...", file=sys.stderr)
            rpc_result = rpc(home, manifest, server.url, args.rpc_samples, args.max_tokens)
            print("first answers ...", file=sys.stderr)
            first = first_answers(home, manifest, server.url, data_dir, args.first_answer_runs)
        finally:
            server.stop()
    version = subprocess.run([nvim_binary(), "--version"], capture_output=True, text=True,
                             check=False).stdout.split("\n", 1)[0]
    result = {"date": now_iso(), "command": command_line(["bench/nvim.py", *argv]),
              "machine": machine,
              "nvim": version, "server_threads": args.server_threads,
              "startup": startup_result, "rpc": rpc_result, "first_answer": first}
    write_json(args.out / "nvim.json", result)
    (args.out / "nvim.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
