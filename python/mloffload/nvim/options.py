"""The plugin's options, as `require('ml-offload.config').get()` returns them."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import ConfigError, parse_duration
from .client import DEFAULT_API_URL

DEFAULT_PARAMS: dict[str, Any] = {"temperature": 0.7, "max_tokens": 1024}
CHAT_KEYS = {"followup": "<CR>", "cancel": "<C-c>", "close": "q"}


class OptionsError(ValueError):
    """An option has a value the plugin cannot use."""


def _text(value: Any, default: str = "") -> str:
    if value is None or value is False:
        return default
    return str(value)


@dataclasses.dataclass(frozen=True)
class PluginOptions:
    api_url: str = DEFAULT_API_URL
    api_key: str = ""
    timeout: float = 30.0  # seconds
    model: str = "default"
    system_prompt: str = ""
    params: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(DEFAULT_PARAMS))
    chat_keys: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(CHAT_KEYS))
    embed_register: str = ""
    fallback: bool = True
    fallback_model: str = "default"
    fallback_keep_alive: float = 300.0
    data_dir: Path | None = None

    @classmethod
    def from_lua(cls, raw: Mapping[str, Any] | None,
                 environ: Mapping[str, str] | None = None) -> PluginOptions:
        raw = raw or {}
        env = os.environ if environ is None else environ
        try:
            timeout_ms = float(raw.get("timeout") or 30000)
        except (TypeError, ValueError):
            timeout_ms = math.nan
        if not math.isfinite(timeout_ms):
            raise OptionsError(
                f"timeout must be milliseconds, not {raw.get('timeout')!r}") from None
        try:
            keep_alive = parse_duration(raw.get("fallback_keep_alive", "5m"))
        except ConfigError as exc:
            raise OptionsError(f"fallback_keep_alive: {exc}") from None
        params = raw.get("params")
        chat_keys = dict(CHAT_KEYS)
        for name, lhs in dict(raw.get("chat_keymaps") or {}).items():
            chat_keys[str(name)] = _text(lhs)
        data_dir = raw.get("data_dir")
        return cls(
            api_url=_text(raw.get("api_url"), DEFAULT_API_URL).rstrip("/"),
            api_key=_text(raw.get("api_key")) or env.get("ML_OFFLOAD_API_KEY", ""),
            timeout=max(timeout_ms, 1.0) / 1000.0,
            model=_text(raw.get("model"), "default") or "default",
            system_prompt=_text(raw.get("system_prompt")),
            params=dict(params) if isinstance(params, Mapping) else dict(DEFAULT_PARAMS),
            chat_keys=chat_keys,
            embed_register=_text(raw.get("embed_register")),
            fallback=bool(raw.get("fallback", True)),
            fallback_model=_text(raw.get("fallback_model"), "default") or "default",
            fallback_keep_alive=keep_alive,
            data_dir=Path(str(data_dir)).expanduser() if data_dir else None,
        )
