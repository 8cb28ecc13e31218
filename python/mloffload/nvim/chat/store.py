"""Saved chats: one markdown file per chat under ``chat.dir``
(default ``stdpath("data")/ml-offload/chats``), the chat's text after a metadata block:

    ---
    title: "Explain what a GGUF file is"
    created: "2026-12-01T10:00:00+00:00"
    updated: "2026-12-01T10:02:13+00:00"
    model: "gemma-3-270m-q4_k_m"
    requested_model: "default"
    where: "server llamacpp"
    params: {"temperature": 0.7, "max_tokens": 1024}
    ---

Each value is JSON (so the block is YAML too). Writes are atomic (a temp file, renamed).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SUFFIX = ".md"
FIELDS = ("title", "created", "updated", "model", "requested_model", "where", "params")


class StoreError(OSError):
    """A chat file cannot be read or written; the message names it."""


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclasses.dataclass
class ChatMeta:
    title: str = "new chat"
    created: str = dataclasses.field(default_factory=now)
    updated: str = ""
    model: str = ""
    requested_model: str = ""
    where: str = ""
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ChatMeta:
        meta = cls()
        for name in FIELDS:
            if name in raw:
                value = raw[name]
                if name == "params":
                    meta.params = dict(value) if isinstance(value, Mapping) else {}
                else:
                    setattr(meta, name, "" if value is None else str(value))
        return meta


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "chat"


def new_path(folder: Path, title: str, created: str | None = None) -> Path:
    """A new chat file's path: its creation time and title, unique in ``folder``."""
    stamp = (created or now())[:19].replace(":", "").replace("-", "").replace("T", "-")
    base = f"{stamp}-{slug(title)}"
    path = folder / (base + SUFFIX)
    n = 2
    while path.exists():
        path = folder / f"{base}-{n}{SUFFIX}"
        n += 1
    return path


def render(meta: ChatMeta, lines: Sequence[str]) -> str:
    head = ["---", *(f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in
                     meta.to_dict().items()), "---", ""]
    return "\n".join([*head, *lines]).rstrip("\n") + "\n"


def parse(text: str) -> tuple[ChatMeta, list[str]]:
    lines = text.split("\n")
    raw: dict[str, Any] = {}
    body = lines
    if lines and lines[0] == "---":
        try:
            end = lines.index("---", 1)
        except ValueError:
            end = -1
        if end > 0:
            for line in lines[1:end]:
                key, sep, value = line.partition(":")
                if not sep:
                    continue
                try:
                    raw[key.strip()] = json.loads(value.strip())
                except ValueError:
                    raw[key.strip()] = value.strip()
            body = lines[end + 1:]
    while body and not body[0].strip():
        body = body[1:]
    while body and not body[-1].strip():
        body = body[:-1]
    return ChatMeta.from_dict(raw), body


def save(path: Path, meta: ChatMeta, lines: Sequence[str]) -> None:
    meta.updated = now()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".chat-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(render(meta, lines))
        os.replace(tmp, path)
    except OSError as exc:
        raise StoreError(f"cannot save the chat to {path}: {exc.strerror or exc}") from None


def load(path: Path) -> tuple[ChatMeta, list[str]]:
    try:
        return parse(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise StoreError(f"cannot read the chat {path}: {exc.strerror or exc}") from None


def listing(folder: Path) -> list[tuple[Path, ChatMeta]]:
    """Every saved chat, the most recently updated first."""
    found = []
    for path in folder.glob("*" + SUFFIX) if folder.is_dir() else []:
        try:
            meta, _ = load(path)
            written = path.stat().st_mtime_ns  # orders two saves within one second
        except (StoreError, OSError):
            continue
        found.append(((meta.updated or meta.created, written), path, meta))
    found.sort(key=lambda item: item[0], reverse=True)
    return [(path, meta) for _, path, meta in found]


def delete(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StoreError(f"cannot delete {path}: {exc.strerror or exc}") from None
