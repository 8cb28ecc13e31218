"""Run the named benchmarks: ``python bench/run.py [NAME ...] [-- OPTIONS]``.

Each benchmark is a module ``bench/<name>.py`` exposing ``main(argv: list[str]) -> int``.
With no names, every benchmark present runs (server, proxy, nvim first, then any other).
Options after the names (or after ``--``) go to each benchmark's ``main``; ``--list``
lists what is present. The exit status is the worst of theirs.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PREFERRED = ("server", "proxy", "nvim")
NOT_BENCHMARKS = {"run", "common", "gpu_check", "gguf_kit"}  # helpers, not benchmarks


def _is_benchmark(path: Path) -> bool:
    """A module with a top-level ``def main(``; helpers beside the benchmarks have none."""
    if path.stem in NOT_BENCHMARKS or path.stem.startswith("_"):
        return False
    try:
        return "\ndef main(" in path.read_text(errors="replace")
    except OSError:
        return False


def available() -> list[str]:
    names = {p.stem for p in BENCH_DIR.glob("*.py") if _is_benchmark(p)}
    return [n for n in PREFERRED if n in names] + sorted(names - set(PREFERRED))


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    names: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return names, argv[i + 1:]
        if arg.startswith("-"):
            return names, argv[i:]
        names.append(arg)
    return names, []


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\npresent:", " ".join(available()) or "(none)")
        return 0
    if argv and argv[0] == "--list":
        print("\n".join(available()))
        return 0
    names, rest = split_argv(argv)
    present = available()
    unknown = [n for n in names if n not in present]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; present: {', '.join(present)}",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(BENCH_DIR))
    worst = 0
    results: list[tuple[str, int, float]] = []
    for name in names or present:
        print(f"=== bench/{name}.py {' '.join(rest)}".rstrip(), flush=True)
        started = time.monotonic()
        try:
            module = importlib.import_module(name)
            entry = getattr(module, "main", None)
            if not callable(entry):
                print(f"bench/{name}.py has no main(argv)", file=sys.stderr)
                code = 2
            else:
                code = int(entry(list(rest)) or 0)
        except SystemExit as exc:  # argparse errors and explicit exits
            code = exc.code if isinstance(exc.code, int) else 1
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one broken benchmark must not hide the others' results
            import traceback

            traceback.print_exc()
            print(f"bench/{name}.py failed: {exc!r}", file=sys.stderr)
            code = 1
        results.append((name, code, time.monotonic() - started))
        worst = max(worst, code)
    if len(results) > 1:
        print("=== summary")
        for name, code, secs in results:
            print(f"  {name:<10} {'ok' if code == 0 else f'exit {code}':<8} {secs:7.1f}s")
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
