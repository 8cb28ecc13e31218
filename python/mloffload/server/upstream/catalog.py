"""What an upstream serves (its ``/v1/models`` and ``/props``), matched to our registry.

A model the upstream serves from a file the registry knows takes the registry's id, aliases
and metadata; anything else keeps the upstream's own id. Names resolve through both.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from ...models.registry import DEFAULT_ALIAS, ModelEntry, Registry, model_card
from ..errors import APIError
from .client import UpstreamClient


class UpstreamModel:
    """One model the upstream serves, matched (by file path) to the registry when known."""

    def __init__(self, upstream_id: str, path: str | None, meta: dict[str, Any], created: int,
                 entry: ModelEntry | None, is_default: bool,
                 upstream_aliases: tuple[str, ...] = ()) -> None:
        self.upstream_id = upstream_id
        self.upstream_aliases = upstream_aliases  # its other names there (llama-server --alias)
        self.path = path
        self.upstream_meta = meta
        self.created = created
        self.entry = entry
        self.id = entry.id if entry is not None else upstream_id
        names = {self.id, upstream_id}
        if entry is not None:
            names.update(a for a in entry.aliases if a != DEFAULT_ALIAS)
        if is_default:
            names.add(DEFAULT_ALIAS)
        self.names = names

    @property
    def n_embd(self) -> int | None:
        n = self.upstream_meta.get("n_embd")
        if isinstance(n, int):
            return n
        info = self.entry.info if self.entry is not None else None
        return info.embedding_length if info else None

    def meta(self) -> dict[str, Any]:
        um = self.upstream_meta
        if self.entry is not None:
            meta = self.entry.summary()
        else:
            meta = {
                "id": self.id, "path": self.path, "usable": True, "reason": None,
                "source": "llama-server", "file_size": None, "architecture": None,
                "name": None, "size_label": None, "parameter_count": um.get("n_params"),
                "quantization": um.get("ftype"), "context_length": um.get("n_ctx_train"),
                "embedding_length": um.get("n_embd"), "block_count": None,
                "has_chat_template": None,
            }
        meta["aliases"] = sorted(self.names - {self.id})
        meta["loaded"] = True
        meta["upstream_id"] = self.upstream_id
        meta["upstream"] = um
        return meta

    def card(self) -> dict[str, Any]:
        return model_card(self.id, self.created, "llama-server", self.meta())


def _same_file(a: str | None, b: str) -> bool:
    if not a:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


async def _nothing() -> None:
    return None


async def fetch_catalog(client: UpstreamClient, registry: Registry | None, props: bool = True
                        ) -> tuple[list[UpstreamModel], int | None]:
    """The upstream's models, and its slot count when it reports one (``props``: ask its
    ``/props``, which llama-server has). With ``registry`` its models are matched to our
    files (the first one also answers to ``default``); without, as a remote upstream's are,
    they keep the upstream's ids."""
    results: tuple[Any, ...] = await asyncio.gather(
        client.get_json("/v1/models"), client.get_json("/props") if props else _nothing(),
        return_exceptions=True)
    listing, props = results
    if isinstance(listing, BaseException):
        raise listing
    if not isinstance(listing, dict):
        raise APIError(502, f"{client.label} sent an unexpected /v1/models.",
                       code="upstream_error")
    client.auth_error = None
    model_path = props.get("model_path") if isinstance(props, dict) else None
    slots = props.get("total_slots") if isinstance(props, dict) else None
    paths: dict[str, str] = {}
    for m in listing.get("models") or []:  # llama-server's ollama-style list has the file
        if isinstance(m, dict) and isinstance(m.get("name"), str):
            paths[m["name"]] = str(m.get("model") or m["name"])
    entries = [e for e in registry.list() if e.usable] if registry is not None else []
    out = []
    data = listing.get("data") or []
    for i, card in enumerate(data):
        uid = str(card.get("id", ""))
        if not uid:
            continue
        candidates = [paths.get(uid), uid]
        if len(data) == 1 and isinstance(model_path, str):
            candidates.insert(0, model_path)
        path = next((p for p in candidates if p and os.path.isfile(p)), None)
        entry = next((e for e in entries if _same_file(path, e.path)), None) if path else None
        meta = card.get("meta") if isinstance(card.get("meta"), dict) else {}
        created = card.get("created")
        aliases = card.get("aliases") if isinstance(card.get("aliases"), list) else []
        out.append(UpstreamModel(
            uid, path or (model_path if isinstance(model_path, str) else None), meta,
            created if isinstance(created, int) else int(time.time()), entry,
            i == 0 and registry is not None,
            tuple(a for a in aliases if isinstance(a, str) and a and a != uid)))
    return out, slots if isinstance(slots, int) and slots > 0 else None
