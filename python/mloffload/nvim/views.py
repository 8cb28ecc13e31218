"""What the status and models floats say, as plain lines (pure functions, easy to test)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

BAR_WIDTH = 24
MiB = 1024**2


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    full = round(fraction * width)
    return "[" + "█" * full + "░" * (width - full) + "]"


def _gb(value: Any) -> str:
    try:
        return f"{float(value):.1f}"
    except (TypeError, ValueError):
        return "?"


def vram_lines(vram: Mapping[str, Any] | None) -> list[str]:
    if not vram:
        return ["VRAM      unknown"]
    if not vram.get("available"):
        return [f"VRAM      no GPU: {vram.get('reason') or 'not available'}"]
    lines = []
    for gpu in vram.get("gpus") or []:
        total = float(gpu.get("total_gb") or 0.0)
        used = float(gpu.get("used_gb") or 0.0)
        frac = used / total if total else 0.0
        lines.append(f"GPU {gpu.get('index', '?')}     {gpu.get('name', '')}: "
                     f"{_gb(used)} / {_gb(total)} GB used, {_gb(gpu.get('free_gb'))} GB free")
        lines.append(f"          {bar(frac)} {frac * 100:.0f}%")
    return lines or ["VRAM      no GPUs listed"]


def loaded_model_lines(status: Mapping[str, Any] | None) -> list[str]:
    models = (status or {}).get("loaded_models") or []
    if not models:
        loading = (status or {}).get("loading") or []
        return [f"Model     {'loading ' + ', '.join(loading) if loading else 'none loaded yet'}"]
    return [f"Model     {m.get('id')}: {m.get('n_gpu_layers')}/{m.get('max_layers')} layers "
            f"on GPU, n_ctx {m.get('n_ctx')}" for m in models]


def status_lines(url: str, health: Mapping[str, Any] | None, status: Mapping[str, Any] | None,
                 vram: Mapping[str, Any] | None, unreachable: str = "",
                 fallback: Mapping[str, Any] | None = None) -> list[str]:
    """The `:MLStatus` float: server and health, backend, loaded model, VRAM per GPU."""
    lines = ["# ml-offload status", ""]
    if unreachable:
        lines.append(f"Server    {url}: unreachable ({unreachable})")
        if fallback is not None:
            lines.append(f"          server unreachable — using in-process fallback "
                         f"({fallback_summary(fallback)})")
        else:
            lines.append("          fallback off; start the server: python -m mloffload.server")
        lines.append("")
        lines.extend(vram_lines(vram))
        return lines
    health = health or {}
    lines.append(f"Server    {url}: {health.get('status', 'unknown')}")
    for name, detail in (health.get("backends") or {}).items():
        if "url" in detail:
            lines.append(upstream_line(detail))
            continue
        ready = "ready" if detail.get("ready") else "not ready"
        lines.append(f"Backend   {name}: {ready} — {detail.get('details', '')}")
    lines.extend(loaded_model_lines(status))
    requests = (status or {}).get("requests") or {}
    if requests:
        lines.append(f"Requests  {requests.get('total', 0)} total, {requests.get('active', 0)} "
                     f"active, {requests.get('completed', 0)} completed, "
                     f"{requests.get('cancelled', 0)} cancelled, {requests.get('failed', 0)} "
                     f"failed; {requests.get('tokens_generated', 0)} tokens generated")
    lines.append("")
    lines.extend(vram_lines(vram))
    return lines


def upstream_line(detail: Mapping[str, Any]) -> str:
    """A remote upstream's health: up with what it serves and how busy, or why not."""
    state = detail.get("state") or ("up" if detail.get("ready") else "down")
    if detail.get("ready"):
        what = (f"serving {', '.join(detail.get('models') or []) or 'no models'}; "
                f"{detail.get('in_flight', 0)} in flight, {detail.get('waiting', 0)} waiting")
    else:
        what = str(detail.get("details") or "")
    return f"Upstream  {detail.get('url')}: {state} — {what}"


def where_runs(meta: Mapping[str, Any]) -> tuple[str, str]:
    """(state, where) of a model: loaded here or not, or its upstream's state and URL."""
    upstream = meta.get("upstream")
    if not isinstance(upstream, Mapping):
        return ("loaded" if meta.get("loaded") else "-"), "local"
    replicas = meta.get("replicas") or []
    more = f" +{len(replicas) - 1} replica{'s' if len(replicas) > 2 else ''}" \
        if len(replicas) > 1 else ""
    return str(upstream.get("state") or "?"), f"{upstream.get('url')}{more}"


def fallback_summary(info: Mapping[str, Any]) -> str:
    if info.get("loaded"):
        return (f"{info.get('model')}, {info.get('n_gpu_layers')}/{info.get('max_layers')} "
                "layers on GPU")
    plan = info.get("plan")
    return f"{info.get('model')}, not loaded yet" + (f"; plan: {plan}" if plan else "")


def _size(n: Any) -> str:
    try:
        value = float(n)
    except (TypeError, ValueError):
        return "?"
    return f"{value / MiB:.0f} MiB" if value < 1024 * MiB else f"{value / 1024**3:.1f} GiB"


MODELS_HEADER = 3  # lines before the first model in the models float


def models_lines(cards: Sequence[Mapping[str, Any]], current: str, where: str,
                 n_ctx: Mapping[str, int | None] | None = None
                 ) -> tuple[list[str], list[str], int]:
    """The `:MLModels` float, per model line the id that `<CR>` selects, and the line
    (1-based) of the current model (else the first model). ``context`` is the context the
    backend runs each model with (``n_ctx``) when known, else the file's trained length."""
    lines = [f"# Models ({where}) — <CR> uses the model under the cursor", "",
             f"  {'id':<28} {'size':>9}  {'quant':<8} {'context':>8}  {'state':<7} where"]
    ids = []
    cursor = 0
    for card in cards:
        meta = card.get("meta") or {}
        mid = str(card.get("id"))
        aliases = [a for a in meta.get("aliases") or [] if a]
        is_current = current in (mid, *aliases)
        mark = "*" if is_current else " "
        state, place = where_runs(meta)
        names = f"  ({', '.join(aliases)})" if aliases else ""
        context = (n_ctx or {}).get(mid) or meta.get("context_length") or "?"
        lines.append(f"{mark} {mid:<28} {_size(meta.get('file_size')):>9}  "
                     f"{meta.get('quantization') or '?'!s:<8} "
                     f"{context!s:>8}  {state:<7} {place}{names}")
        ids.append(mid)
        if is_current and not cursor:
            cursor = len(lines)
    if not ids:
        lines.append("  (no models in the registry)")
    return lines, ids, cursor or MODELS_HEADER + 1


def error_lines(url: str, message: str) -> list[str]:
    """The `:MLStatus` float when the server answered with an error: what, and what to do."""
    return ["# ml-offload status", "", f"Server    {url}: error", "",
            *(f"          {part.strip()}" for part in message.split(" — ")), ""]
