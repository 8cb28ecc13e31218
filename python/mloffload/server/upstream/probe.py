"""Is a llama-server ready? Its ``/health`` (open to all), and our key checked on the side.

llama-server's ``/health`` needs no key, so alone it would say "ready" while every real
request is refused: until a keyed call (the model list) has come back, or while our key is
refused, readiness asks for one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from ..backend import Health, HealthState
from ..errors import APIError
from .client import HEALTH_TIMEOUT, UpstreamClient


async def probe(client: UpstreamClient, check_key: bool, keyed_call: Callable[[], Awaitable[None]],
                also: str = "") -> Health:
    """``check_key``: make ``keyed_call`` (which notes a refused key on the client) even
    when no refusal is known yet. ``also`` is appended to an unreachable reason."""
    try:
        status, content = await client.get_status("/health", timeout=HEALTH_TIMEOUT)
    except APIError as exc:
        why = exc.message + (f"; {also}" if also else "")
        return Health(HealthState.UNAVAILABLE, why,
                      {"available": False, "ready": False, "details": why})
    if status == 200:
        if client.auth_error is not None or check_key:
            await keyed_call()
        if client.auth_error is not None:
            return Health(HealthState.UNAVAILABLE, client.auth_error,
                          {"available": True, "ready": False, "details": client.auth_error})
        return Health(HealthState.READY, "", {"available": True, "ready": True,
                                              "details": "llama-server is running and ready"})
    said = client.error(status, content).message.removeprefix("llama-server: ")
    if status == 503 and "loading" in said.lower():
        details = f"{client.label} is loading its model ({said})"
        return Health(HealthState.LOADING, f"loading model in {client.label} ({said})",
                      {"available": True, "ready": False, "details": details})
    details = f"{client.label} is not ready: HTTP {status}, {said}"
    return Health(HealthState.UNAVAILABLE, details,
                  {"available": True, "ready": False, "details": details})


async def props_summary(client: UpstreamClient) -> dict[str, Any]:
    """What ``/props`` and ``/slots`` say about the upstream, for `/api/backend/info`."""
    results: tuple[Any, ...] = await asyncio.gather(
        client.get_json("/props"), client.get_json("/slots"), return_exceptions=True)
    props, slots = results
    out: dict[str, Any] = {}
    if isinstance(props, dict):
        gen = props.get("default_generation_settings") or {}
        out.update({
            "build_info": props.get("build_info"),
            "model_path": props.get("model_path"),
            "model_alias": props.get("model_alias"),
            "n_ctx": gen.get("n_ctx") if isinstance(gen, dict) else None,
            "total_slots": props.get("total_slots"),
            "modalities": props.get("modalities"),
        })
    if isinstance(slots, list):
        out["slots_busy"] = sum(1 for s in slots if isinstance(s, dict) and s.get("is_processing"))
    return out
