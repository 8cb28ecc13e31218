"""Proxy to llama.cpp's own llama-server (work in progress: being written now)."""

from __future__ import annotations

from ..config import ConfigError, Settings
from ..registry import Registry
from .stats import Stats


class UpstreamBackend:
    name = "llama-server"

    def __init__(self, settings: Settings, registry: Registry, stats: Stats) -> None:
        raise ConfigError("the llama-server backend is not available in this build yet")
