"""Ghost text, measured on a real headless Neovim typing into a real source file (issue 14).

1. Keystroke → ghost text shown, p50 and p90: the same /infill requests (same buffer, same
   keys at the same places, same extra chunks, greedy) from the plugin to ml-offload in
   managed mode, to ml-offload in-process, and to llama-server directly (started as managed
   mode starts its engines), each its own server. At each of several places in a real
   source file the editor types a few keys, as someone writing there would: the first key
   at a place finds the server's prompt cache cold (the prefix is new), the next ones warm
   (only the cursor line and what follows change). Interleaved place by place. The clock
   runs in the editor: from the key's TextChangedI to the first ghost text drawn, with
   `debounce_ms = 0` (a user waits the debounce, 100 ms by default, on top).
2. The transports from Lua to ml-offload (managed, a server each): vim.uv (the default),
   curl per request, and the Python host (the remote plugin), on the same keys.
3. Keystroke latency while completions run, against idle: from nvim_input(key) until
   Neovim answers that the line has the key (Neovim handles typed keys, and the
   autocommands they trigger, before it reads the next RPC request); a key every 150 ms,
   longer than the 100 ms debounce, so that between keys a completion is requested, streams
   and is cancelled by the next key. Target: p99 ≤ 2× idle. A control row types with ghost
   text off while another client keeps the server generating: the CPU the server takes
   from the editor, without the plugin's own work.

The model is the FIM test model (tests/fim_model.py): the embedded Gemma with unused tokens
named as FIM tokens. Its text is nonsense; the requests, the prompt sizes and every code
path are real. Writes bench/results/complete.{json,md}.

    python bench/complete.py [--places 8] [--keys-per-place 5] [--keys 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
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
    now_iso,
    parse_shared_args,
    percentile,
    write_json,
)
from fim_model import FIM_ID, build_fim_model  # noqa: E402
from nvim_harness import REPO, Editor, nvim_binary, register_plugin  # noqa: E402

SOURCE = REPO / "python" / "mloffload" / "engine" / "fim.py"  # the file typed into
GREEDY = {"temperature": 0, "samplers": ["temperature"]}
KEY_INTERVAL = 0.15


def editor(home: Path, manifest: Path, url: str, data_dir: Path, **complete: Any) -> Editor:
    opts = {"debounce_ms": 0, "params": GREEDY, **complete}
    ed = Editor(home, manifest, env={"ML_OFFLOAD_DATA_DIR": str(data_dir)},
                setup={"api_url": url, "fallback": False, "complete": opts})
    ed.nvim.command(f"cd {REPO}")
    ed.nvim.command(f"edit {SOURCE}")
    ed.nvim.command("setlocal nomodified noswapfile")
    # The same extra context everywhere: a chunk yanked from another file.
    ed.nvim.command(f"split {REPO / 'python' / 'mloffload' / 'engine' / 'stops.py'}")
    ed.nvim.command("normal! 5Gy20j")
    ed.nvim.command("close")
    return ed


def stats(ed: Editor) -> dict[str, Any]:
    return dict(ed.lua("return require('ml-offload.complete').stats()"))


TYPED = "ab#c@"  # characters the model is unlikely to have suggested next


def place(ed: Editor, row: int, keys: int, timeout: float = 60.0) -> list[float | None]:
    """At the end of line ``row``: type ``keys`` characters, one at a time, each once the
    ghost text for the previous one showed (or its request ended with nothing to show);
    the ms from each key to its ghost text (None: nothing shown, or no request made)."""
    lines = ed.nvim.current.buffer[:]
    ed.keys("<Esc>")
    ed.nvim.api.win_set_cursor(0, [row, len(lines[row - 1])])
    ed.nvim.command("let b:mloffload_complete = v:false")  # no request on entering insert
    ed.keys("a")
    ed.nvim.command("let b:mloffload_complete = v:true")
    out: list[float | None] = []
    for k in range(keys):
        before = stats(ed)
        ed.keys(TYPED[k % len(TYPED)])
        value = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = stats(ed)
            if now["shown"] > before["shown"]:
                value = float(now["latencies"][-1])
                break
            if now["requests"] > before["requests"] and not now["in_flight"]:
                break
            time.sleep(0.005)
        out.append(value)
    ed.keys("<Esc>u")  # the place as it was, for the next
    return out


def ghost_latency(eds: dict[str, Editor], rows: Sequence[int], keys: int) -> dict[str, Any]:
    """Every editor at every place, interleaved; a key counts where all showed ghost text."""
    raw: dict[str, list[list[float | None]]] = {name: [] for name in eds}
    for i, row in enumerate(rows):
        order = list(eds)
        order = order[i % len(order):] + order[:i % len(order)]  # rotate who goes first
        for name in order:
            raw[name].append(place(eds[name], row, keys))
    out: dict[str, Any] = {"places": len(rows), "keys_per_place": keys, "systems": {}}
    for name in eds:
        cold, warm = [], []
        for p in range(len(rows)):
            for k in range(keys):
                if all(raw[n][p][k] is not None for n in eds):
                    (cold if k == 0 else warm).append(raw[name][p][k])
        out["systems"][name] = {
            "cold": {"n": len(cold), "p50_ms": percentile(cold, 50),
                     "p90_ms": percentile(cold, 90)},
            "warm": {"n": len(warm), "p50_ms": percentile(warm, 50),
                     "p90_ms": percentile(warm, 90)},
            "samples": raw[name]}
    return out


def generate_elsewhere(url: str, stop: threading.Event) -> threading.Thread:
    """The control's load: another client keeps the server generating."""
    body = {"input_prefix": SOURCE.read_text()[:3000], "input_suffix": "\n", "n_predict": 64,
            "temperature": 0, "samplers": ["temperature"], "cache_prompt": False}

    def run() -> None:
        while not stop.is_set():
            try:
                httpx.post(url + "/infill", json=body, timeout=120)
            except httpx.HTTPError:
                time.sleep(0.5)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def key_times(ed: Editor, keys: int) -> list[float]:
    """ms from each key sent until the line shows it, on a new line at the end."""
    out = []
    ed.keys("<Esc>")
    ed.nvim.command("normal! G")
    ed.keys("o")
    time.sleep(0.3)
    for i in range(keys):
        char = "abcdefghij"[i % 10]
        start = time.perf_counter()
        ed.nvim.input(char)
        while len(ed.nvim.eval("getline('.')")) < i + 1:
            pass
        out.append((time.perf_counter() - start) * 1000)
        time.sleep(KEY_INTERVAL)
    ed.keys("<Esc>")
    return out


def keystrokes(ed: Editor, keys: int, url: str) -> dict[str, Any]:
    ed.nvim.command("MLComplete off")
    idle = key_times(ed, keys)
    stop = threading.Event()
    load = generate_elsewhere(url, stop)
    time.sleep(1.0)
    control = key_times(ed, keys)
    stop.set()
    load.join(120)
    ed.nvim.command("MLComplete on")
    before = stats(ed)
    running = key_times(ed, keys)
    after = stats(ed)
    p99_idle, p99_run = percentile(idle, 99), percentile(running, 99)
    return {
        "keys": keys, "interval_ms": KEY_INTERVAL * 1000,
        "idle_ms": {"p50": percentile(idle, 50), "p99": p99_idle},
        "control_ms": {"p50": percentile(control, 50), "p99": percentile(control, 99)},
        "running_ms": {"p50": percentile(running, 50), "p99": p99_run},
        "requests": after["requests"] - before["requests"],
        "cancelled": after["cancelled"] - before["cancelled"],
        "shown": after["shown"] - before["shown"],
        "p99_ratio": None if not p99_idle or p99_run is None else p99_run / p99_idle,
        "target_p99_ratio": 2.0,
    }


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    g, t, k = result["ghost"], result["transports"], result["keystrokes"]

    def rows(block: dict[str, Any], labels: dict[str, str]) -> list[list[str]]:
        return [[labels[n], fmt(s["warm"]["p50_ms"], 0), fmt(s["warm"]["p90_ms"], 0),
                 fmt(s["cold"]["p50_ms"], 0), fmt(s["cold"]["p90_ms"], 0)]
                for n, s in block["systems"].items()]

    def counts(block: dict[str, Any]) -> str:
        first = next(iter(block["systems"].values()))
        return (f"{block['places']} places × {block['keys_per_place']} keys; counted where "
                f"every system showed ghost text: {first['warm']['n']} warm keys, "
                f"{first['cold']['n']} first keys.")

    head = ["system", "warm p50", "warm p90", "first key p50", "first key p90"]
    align = ["l", "r", "r", "r", "r"]
    return "\n".join([
        "# Ghost text benchmark", "",
        f"{result['date']} · `{result['command']}` · {m['cpu'].get('model')}, "
        f"{m['cpus_usable']} CPUs usable, load {m['loadavg_at_start']} · Neovim "
        f"{result['nvim']} · llama.cpp threads {result['threads']} · the FIM test model "
        "(nonsense text, real requests) · n_ctx 2048, the plugin's default budgets", "",
        "## Keystroke → ghost text shown (ms, debounce 0)", "",
        md_table(head, rows(g, {
            "managed": "ml-offload, managed (engine process)",
            "inprocess": "ml-offload, in-process",
            "llama_server": "llama-server direct"}), align), "",
        counts(g) + f" Places: ends of lines of `{SOURCE.relative_to(REPO)}`. Warm: a key "
        "after the first at a place (the server evaluates the changed cursor line and "
        "suffix); first key: the prefix is new to the server too.", "",
        "## Transport from Lua to ml-offload (managed; ms, debounce 0)", "",
        md_table(head, rows(t, {
            "uv": "vim.uv socket (default)", "curl": "curl per request",
            "python": "Python host (remote plugin)"}), align), "",
        counts(t), "",
        "## Keystroke latency while completions run (ms)", "",
        md_table(["", "p50", "p99"], [
            ["idle (ghost text off)", fmt(k["idle_ms"]["p50"], 2), fmt(k["idle_ms"]["p99"], 2)],
            ["control: off, the server generating for another client",
             fmt(k["control_ms"]["p50"], 2), fmt(k["control_ms"]["p99"], 2)],
            ["completions running", fmt(k["running_ms"]["p50"], 2),
             fmt(k["running_ms"]["p99"], 2)],
        ], ["l", "r", "r"]), "",
        f"p99 running / idle: **{fmt(k['p99_ratio'], 2)}×** (target ≤ "
        f"{k['target_p99_ratio']:g}×). {k['keys']} keys each, one every "
        f"{k['interval_ms']:g} ms (from nvim_input to the line showing the key, over RPC); "
        f"while running: {k['requests']} requests, {k['cancelled']} cancelled by the next "
        f"key, {k['shown']} shown.", "",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/complete.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--places", type=int, default=8)
    parser.add_argument("--keys-per-place", type=int, default=5)
    parser.add_argument("--keys", type=int, default=300, help="keys of the latency part")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    argv = sys.argv[1:] if argv is None else argv
    args = parse_shared_args(parser, argv, "complete")

    from llama_server import llama_server_bin
    from mloffload.models.catalog import embedded_model_path, ensure_embedded_model

    binary = str(llama_server_bin())
    with tempfile.TemporaryDirectory(prefix="ml-offload-bench-complete-") as tmp:
        home = Path(tmp)
        data_dir = home / "data"
        ensure_embedded_model(data_dir)
        models = home / "models"
        fim = build_fim_model(embedded_model_path(data_dir), models)
        manifest = register_plugin(home / "register")
        machine = machine_info()
        common = ["--threads", str(args.threads), "--n-ctx", "2048", "--parallel", "1",
                  "--models-dir", str(models), "--default-model", FIM_ID]
        servers: dict[str, ManagedProcess] = {}
        for name, backend in (("managed", "managed"), ("inprocess", "llamacpp"),
                              ("curl", "managed"), ("python", "managed")):
            port = free_port()
            servers[name] = ManagedProcess(
                name, [sys.executable, "-m", "mloffload.server", "--port", str(port),
                       "--backend", backend, *common], url=f"http://127.0.0.1:{port}",
                log_dir=home / "logs", env={"ML_OFFLOAD_DATA_DIR": str(home / name),
                                            "ML_OFFLOAD_LLAMA_SERVER_BIN": binary})
        port = free_port()
        servers["llama_server"] = ManagedProcess(
            "llama_server", [binary, "-m", str(fim), "--port", str(port), "-c", "2048",
                             "--parallel", "1", "-t", str(args.threads), "--embeddings",
                             "--pooling", "mean", "--no-webui"],
            url=f"http://127.0.0.1:{port}", log_dir=home / "logs")
        eds: dict[str, Editor] = {}
        try:
            for s in servers.values():
                s.wait_ready("/health")
            n = len(SOURCE.read_text().splitlines())
            rows = list(dict.fromkeys(1 + (i * 37) % n for i in range(args.places)))
            for name, s in servers.items():
                transport = name if name in ("curl", "python") else "uv"
                eds[name] = editor(home / f"ed-{name}", manifest, s.url, data_dir,
                                   transport=transport)
            for ed in eds.values():  # warm-up: the model loaded, the host started
                place(ed, n, 1)
            print(f"keystroke → ghost text at {len(rows)} places ...", file=sys.stderr)
            ghost = ghost_latency({k: eds[k] for k in ("managed", "inprocess", "llama_server")},
                                  rows, args.keys_per_place)
            print("transports ...", file=sys.stderr)
            transports = ghost_latency({"uv": eds["managed"], "curl": eds["curl"],
                                        "python": eds["python"]}, rows, args.keys_per_place)
            print("keystroke latency ...", file=sys.stderr)
            url = servers["managed"].url
            keys_ed = editor(home / "ed-keys", manifest, url, data_dir, debounce_ms=100,
                             params={})
            eds["keys"] = keys_ed
            keys = keystrokes(keys_ed, args.keys, url)
        finally:
            for ed in eds.values():
                ed.close()
            for s in servers.values():
                s.stop()
    version = subprocess.run([nvim_binary(), "--version"], capture_output=True, text=True,
                             check=False).stdout.split("\n", 1)[0]
    result = {"date": now_iso(), "command": command_line(["bench/complete.py", *argv]),
              "machine": machine, "nvim": version, "threads": args.threads,
              "ghost": ghost, "transports": transports, "keystrokes": keys}
    write_json(args.out / "complete.json", result)
    (args.out / "complete.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
