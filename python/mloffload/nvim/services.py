"""What every part of the plugin is handed: the bridge to Neovim, the router (server or
fallback), and the request counter."""

from __future__ import annotations

import dataclasses

from .bridge import Bridge
from .lua import Lua
from .requests import Requests
from .routing import Router


@dataclasses.dataclass(frozen=True)
class Services:
    bridge: Bridge
    router: Router
    requests: Requests

    @property
    def lua(self) -> Lua:
        return self.bridge.lua
