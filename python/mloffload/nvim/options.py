"""The plugin's options, read from the merged table the Lua layer sends with every call
(``require('ml-offload.config').resolved()``). The defaults live in Lua only
(``lua/ml-offload/config.lua``); a key missing here means a broken Lua layer, not a default.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import ConfigError, parse_duration


class OptionsError(ValueError):
    """An option has a value the plugin cannot use."""


def _text(value: Any) -> str:
    if value is None or value is False:
        return ""
    return str(value)


def _need(raw: Mapping[str, Any], key: str) -> Any:
    if key not in raw:
        raise OptionsError(f"the Lua layer sent no {key!r} option: update the plugin's lua/ "
                           "and rplugin/ together, then run :UpdateRemotePlugins")
    return raw[key]


@dataclasses.dataclass(frozen=True)
class ChatOptions:
    dir: Path
    save: bool


@dataclasses.dataclass(frozen=True)
class PluginOptions:
    api_url: str
    api_key: str
    timeout: float  # seconds of silence allowed from a server that is answering
    model: str
    system_prompt: str
    params: Mapping[str, Any]
    embed_register: str
    fallback: bool
    fallback_model: str
    fallback_keep_alive: float
    data_dir: Path | None
    chat: ChatOptions

    @classmethod
    def from_lua(cls, raw: Mapping[str, Any],
                 environ: Mapping[str, str] | None = None) -> PluginOptions:
        env = os.environ if environ is None else environ
        timeout = _need(raw, "timeout")
        try:
            timeout_ms = float(timeout)
        except (TypeError, ValueError):
            raise OptionsError(
                f"timeout must be milliseconds, not {raw.get('timeout')!r}") from None
        keep_alive_text = _need(raw, "fallback_keep_alive")
        try:
            keep_alive = parse_duration(keep_alive_text)
        except ConfigError as exc:
            raise OptionsError(f"fallback_keep_alive: {exc}") from None
        params = _need(raw, "params")
        chat = _need(raw, "chat")
        if not isinstance(chat, Mapping) or not chat.get("dir"):
            raise OptionsError("chat.dir is missing: the Lua layer resolves it (update lua/)")
        data_dir = raw.get("data_dir")
        model = _text(_need(raw, "model")).strip()
        fallback_model = _text(_need(raw, "fallback_model")).strip()
        if not model or not fallback_model:
            raise OptionsError("model and fallback_model must name a model")
        return cls(
            api_url=_text(_need(raw, "api_url")).rstrip("/"),
            api_key=_text(raw.get("api_key")) or env.get("ML_OFFLOAD_API_KEY", ""),
            timeout=max(timeout_ms, 1.0) / 1000.0,
            model=model,
            system_prompt=_text(raw.get("system_prompt")),
            params=dict(params) if isinstance(params, Mapping) else {},
            embed_register=_text(_need(raw, "embed_register")),
            fallback=bool(_need(raw, "fallback")),
            fallback_model=fallback_model,
            fallback_keep_alive=keep_alive,
            data_dir=Path(str(data_dir)).expanduser() if data_dir else None,
            chat=ChatOptions(dir=Path(str(chat["dir"])).expanduser(),
                             save=bool(_need(chat, "save"))),
        )

    @property
    def max_tokens(self) -> int | None:
        value = self.params.get("max_tokens", self.params.get("max_completion_tokens"))
        try:
            return int(value) if value is not None else None
        except (TypeError, ValueError):
            return None
