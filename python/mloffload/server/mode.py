"""Which backend runs, and why: decided once from the settings and what the machine has."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import ConfigError, Settings
from ..engine.build import find_llama_server


@dataclasses.dataclass(frozen=True)
class Mode:
    backend: str  # "managed", "llamacpp" or "llama-server"
    why: str  # for the start log and /api/backend/info
    binary: Path | None = None  # managed: the llama-server that runs the engines
    found_in: str = ""


def resolve_mode(settings: Settings) -> Mode:
    """``auto`` is managed mode when a llama-server binary is at hand (the setting, this
    machine's build in the cache, or PATH), else in-process llama.cpp."""
    if settings.backend == "llama-server":
        return Mode("llama-server", f"backend llama-server: a proxy to {settings.llamacpp_url}")
    if settings.backend == "llamacpp":
        return Mode("llamacpp", "backend llamacpp: llama.cpp inside this process")
    binary, found_in = find_llama_server(settings.llama_server_bin)
    if binary is None:
        if settings.backend == "managed":
            raise ConfigError(f"backend managed needs a llama-server binary: {found_in}")
        return Mode("llamacpp", f"backend auto: {found_in}, so llama.cpp runs inside this "
                    "process")
    return Mode("managed", f"backend {settings.backend}: each model in its own llama-server "
                f"process ({binary}, from {found_in})", binary, found_in)
