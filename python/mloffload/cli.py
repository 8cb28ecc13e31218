"""``python -m mloffload`` / ``ml-offload``: registry and planning commands that load nothing.

    ml-offload models [--json]                      the registry as a table (or JSON)
    ml-offload plan MODEL [--free-vram SIZE] [--n-ctx N] [--n-gpu-layers N]
                                                    "will this fit?" as JSON
    ml-offload doctor [--json] [--fresh]            can this machine run its llama.cpp builds?
                                                    (one token and one embedding, in a child)
    ml-offload serve [server options]               same as python -m mloffload.server

Both read the same configuration (environment, --config TOML) as the server.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import ConfigError, Settings, load_settings, parse_gpu_layers, parse_size
from .logs import setup_logging
from .models.catalog import CatalogError, open_registry
from .models.gguf_info import GGUFError, read_gguf_info
from .models.registry import ModelEntry


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def models_table(entries: Sequence[ModelEntry]) -> str:
    rows = [("ID", "ALIASES", "ARCH", "SIZE", "QUANT", "CONTEXT", "STATUS")]
    for e in entries:
        info = e.info
        rows.append((
            e.id,
            ",".join(e.aliases) or "-",
            info.architecture if info else "-",
            _human(e.size),
            info.file_type if info else "-",
            str(info.context_length) if info else "-",
            "ok" if e.usable else f"unusable: {e.reason}",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
             for r in rows]
    return "\n".join(lines)


def _settings(config_args: list[str]) -> Settings:
    return load_settings(config_args)


def cmd_models(args: argparse.Namespace) -> int:
    registry = open_registry(_settings(args.server_args))
    try:
        entries = registry.list()
        if args.json:
            print(json.dumps([e.summary() for e in entries], indent=2))
        else:
            print(models_table(entries))
    finally:
        registry.close()
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .hardware.gpu import GPUProbe
    from .hardware.planner import plan_offload

    settings = _settings(args.server_args)
    # A registered id/alias, or (a local convenience) a .gguf path on disk.
    registry = open_registry(settings)
    try:
        entry = registry.resolve(args.model)
        info = entry.info if entry else None
        if entry is not None and info is None:
            raise GGUFError(f"model {entry.id!r} is unusable: {entry.reason}")
    finally:
        registry.close()
    if info is None:
        if not Path(args.model).is_file():
            print(f"ml-offload: unknown model {args.model!r} (see: ml-offload models)",
                  file=sys.stderr)
            return 1
        info = read_gguf_info(args.model)
    n_ctx = args.n_ctx or settings.n_ctx
    if info.context_length:
        n_ctx = min(n_ctx, info.context_length)
    offload_supported = True
    no_gpu_reason = ""
    if args.free_vram is not None:
        free: int | None = parse_size(args.free_vram)
    else:
        snap = GPUProbe().snapshot()
        gpu = snap.gpu(settings.gpu) if snap.available else None
        free = gpu.free_bytes if gpu else None
        no_gpu_reason = snap.reason
        from .engine.llamacpp import engine_facts

        facts = engine_facts()
        offload_supported = bool(facts.get("supports_gpu_offload"))
    requested = settings.n_gpu_layers
    if args.n_gpu_layers is not None:
        requested = parse_gpu_layers(args.n_gpu_layers)
    plan = plan_offload(info, n_ctx=n_ctx, free_vram=free, margin=settings.vram_margin,
                        requested=requested, offload_supported=offload_supported,
                        no_gpu_reason=no_gpu_reason)
    out: dict[str, Any] = {"model": args.model, "path": info.path, **plan.to_dict()}
    print(json.dumps(out, indent=2))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Smoke-test every engine this machine has; exit 1 (with one line each) if one fails."""
    from .engine import doctor

    settings = _settings(args.server_args)
    model = Path(args.model) if args.model else None
    checks = doctor.check_engines(settings, use_cache=not args.fresh, model=model)
    if args.json:
        print(json.dumps([c.to_dict() for c in checks], indent=2))
    else:
        for c in checks:
            print(("ok: " if c.ok else "FAILED: ") + c.line,
                  file=sys.stdout if c.ok else sys.stderr)
            if c.ok and c.detail.get("system_info"):
                print(f"    system info: {c.detail['system_info']}")
    return 0 if all(c.ok for c in checks) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ml-offload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_models = sub.add_parser("models", help="list the model registry")
    p_models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_models.set_defaults(func=cmd_models)
    p_plan = sub.add_parser("plan", help="print the GPU offload plan for a model as JSON")
    p_plan.add_argument("model", help="registry id or alias (e.g. default), or a .gguf path")
    p_plan.add_argument("--free-vram", help="plan for this much free VRAM (e.g. 6GiB) "
                        "instead of asking the GPU")
    p_plan.add_argument("--n-ctx", type=int, help="context length to plan the KV cache for")
    p_plan.add_argument("--n-gpu-layers", help="explicit layer count (overrides auto)")
    p_plan.set_defaults(func=cmd_plan)
    p_doctor = sub.add_parser("doctor", help="smoke-test the llama.cpp builds (a token and an "
                              "embedding, in a child process)")
    p_doctor.add_argument("--json", action="store_true", help="print JSON")
    p_doctor.add_argument("--fresh", action="store_true", help="ignore cached results")
    p_doctor.add_argument("--model", help="smoke-test with this .gguf instead of the "
                          "embedded Gemma 3 270M")
    p_doctor.add_argument("--llama-server-bin", help="check this llama-server (as the "
                          "server setting)")
    p_doctor.set_defaults(func=cmd_doctor)
    sub.add_parser("serve", help="start the server (python -m mloffload.server --help)",
                   add_help=False)
    for p in (p_models, p_plan, p_doctor):
        p.add_argument("--config", help="TOML settings file (as for the server)")
        p.add_argument("--models-dir", help="folders to scan (as for the server)")
        p.add_argument("--data-dir", help="data folder (as for the server)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["serve"]:
        from .server.__main__ import main as serve

        return serve(args_list[1:])
    args = build_parser().parse_args(args_list)
    args.server_args = []
    for name in ("config", "models_dir", "data_dir", "llama_server_bin"):
        value = getattr(args, name, None)
        if value:
            args.server_args += ["--" + name.replace("_", "-"), value]
    setup_logging("warning")
    try:
        return int(args.func(args))
    except (ConfigError, CatalogError, GGUFError) as exc:
        print(f"ml-offload: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. piped into head
        return 0


if __name__ == "__main__":
    sys.exit(main())
