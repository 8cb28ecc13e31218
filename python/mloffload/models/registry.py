"""The model registry: GGUF files found on disk, their metadata, ids and aliases, in SQLite.

A request's ``model`` is only ever looked up here (id or alias, exact match). Nothing a
client sends is treated as a path, so a name like ``../../etc/passwd`` is simply unknown.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .gguf_info import INFO_VERSION, GGUFError, GGUFInfo, read_gguf_info

log = logging.getLogger("mloffload.registry")

DEFAULT_ALIAS = "default"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    usable INTEGER NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    info TEXT,
    source TEXT NOT NULL,
    scanned_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    id: str
    path: str
    size: int
    mtime: float
    usable: bool
    reason: str
    info: GGUFInfo | None
    source: str  # "scan", "embedded" or "config"
    aliases: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        """The fields users see in `/v1/models`, `:MLModels` and `ml-offload models`."""
        info = self.info
        return {
            "id": self.id,
            "aliases": list(self.aliases),
            "path": self.path,
            "usable": self.usable,
            "reason": self.reason or None,
            "source": self.source,
            "file_size": self.size,
            "architecture": info.architecture if info else None,
            "name": info.name if info else None,
            "size_label": info.size_label if info else None,
            "parameter_count": info.parameter_count if info else None,
            "quantization": info.file_type if info else None,
            "context_length": info.context_length if info else None,
            "embedding_length": info.embedding_length if info else None,
            "block_count": info.block_count if info else None,
            "has_chat_template": info.has_chat_template if info else None,
            "fim": info.can_fim if info else None,
        }


    def card(self, *, loaded: bool, owned_by: str = "ml-offload", **extra: Any
             ) -> dict[str, Any]:
        """This model as a `/v1/models` entry (the server, the proxy and the fallback)."""
        return model_card(self.id, int(self.mtime), owned_by,
                          {**self.summary(), "loaded": loaded, **extra})


def model_card(model_id: str, created: int, owned_by: str, meta: dict[str, Any]
               ) -> dict[str, Any]:
    """An OpenAI model object, with our details in ``meta``."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by,
            "meta": meta}


def file_changed(entry: ModelEntry) -> bool:
    """Whether ``entry``'s file is no longer the one registered: gone, or another size or
    mtime. A model file is mapped into memory while loaded; one truncated under it kills
    the process that touches it (SIGBUS), so it is checked before each use."""
    try:
        st = os.stat(entry.path)
    except OSError:
        return True
    return st.st_size != entry.size or st.st_mtime != entry.mtime


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")


class Registry:
    """Thread-safe; the in-memory view is rebuilt from SQLite after every change.

    ``db_path`` None keeps the database in memory (a data folder that cannot be written).
    Opening raises sqlite3.DatabaseError for a database that is not one, or fails its
    integrity check; ``catalog.open_database`` decides what to do about it.
    """

    def __init__(self, db_path: Path | None) -> None:
        if db_path is not None:
            db_path.parent.mkdir(parents=True, exist_ok=True)
        self.path = db_path
        self._lock = threading.RLock()
        self._entries: dict[str, ModelEntry] = {}
        self._aliases: dict[str, str] = {}
        self._db = sqlite3.connect(":memory:" if db_path is None else str(db_path),
                                   check_same_thread=False, isolation_level=None)
        try:
            self._open()
        except BaseException:
            self._db.close()
            raise

    def _open(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        check = self._db.execute("PRAGMA quick_check").fetchone()
        if check is None or check[0] != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {check and check[0]}")
        self._db.executescript(_SCHEMA)
        stored = self._db.execute("SELECT value FROM meta WHERE key = 'info_version'").fetchone()
        if stored is None or stored[0] != str(INFO_VERSION):
            # Metadata cached by another version: forget it so every file is read again.
            self._db.execute("UPDATE models SET size = -1, info = NULL")
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('info_version', ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(INFO_VERSION),),
            )
        self._reload()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- scanning -------------------------------------------------------------------

    def scan(self, dirs: Iterable[Path]) -> dict[str, int]:
        """Register every ``*.gguf`` under ``dirs``; unchanged files (size, mtime) are skipped."""
        counts = {"found": 0, "read": 0, "unchanged": 0, "removed": 0, "unusable": 0}
        seen: set[str] = set()
        scanned_dirs = [d.expanduser().resolve() for d in dirs]
        for folder in scanned_dirs:
            if not folder.is_dir():
                log.warning("models dir %s does not exist; skipping it", folder)
                continue
            for path in sorted(folder.rglob("*.gguf")):
                if not path.is_file():
                    continue
                counts["found"] += 1
                entry, read = self._register(path.resolve(), "scan")
                seen.add(entry.path)
                counts["read" if read else "unchanged"] += 1
                if not entry.usable:
                    counts["unusable"] += 1
        with self._lock:
            rows = self._db.execute("SELECT id, path FROM models WHERE source = 'scan'").fetchall()
            for model_id, path in rows:
                # Gone from disk, or its folder is no longer configured.
                if path not in seen:
                    self._db.execute("DELETE FROM models WHERE id = ?", (model_id,))
                    counts["removed"] += 1
            self._reload()
        return counts

    def verify(self, model_id: str) -> ModelEntry | None:
        """The entry as its file is now: read again when its size or mtime changed,
        unusable (with the reason) while the file is gone or unreadable. Every backend calls
        it before it trusts an entry: readiness, the model list, a load."""
        entry = self.get(model_id)
        if entry is None or not file_changed(entry):
            return entry
        path = Path(entry.path)
        try:
            fresh, _ = self._register(path, entry.source)
        except OSError as exc:
            if entry.size == -1 and not entry.usable:
                return entry  # still gone: said so already
            reason = f"the file {path} is missing or unreadable ({exc.strerror or exc})"
            log.warning("model %s is unusable: %s", model_id, reason)
            with self._lock:
                self._db.execute("UPDATE models SET usable = 0, reason = ?, size = -1 "
                                 "WHERE id = ?", (reason, model_id))
        else:
            log.warning("model %s: its file changed on disk (%d bytes, was %d); read again",
                        model_id, fresh.size, entry.size)
        with self._lock:
            self._reload()
        return self._entries.get(model_id)

    def register_file(self, path: Path, source: str) -> ModelEntry:
        entry, _ = self._register(path.expanduser().resolve(), source)
        with self._lock:
            self._reload()
        return self._entries[entry.id]

    def _register(self, path: Path, source: str) -> tuple[ModelEntry, bool]:
        """Insert or refresh one file; returns the entry and whether its header was read."""
        st = path.stat()
        with self._lock:
            row = self._db.execute(
                "SELECT id, size, mtime, usable, reason, info, source FROM models WHERE path = ?",
                (str(path),),
            ).fetchone()
            if row and row[1] == st.st_size and row[2] == st.st_mtime:
                if source != "scan" and row[6] != source:
                    self._db.execute("UPDATE models SET source = ? WHERE id = ?", (source, row[0]))
                return self._row_entry(row[0], str(path), row[1], row[2], row[3], row[4], row[5],
                                       source), False
            model_id = row[0] if row else self._free_id(slug(path.stem) or "model", str(path))
        started = time.monotonic()
        try:
            info: GGUFInfo | None = read_gguf_info(path)
            usable, reason = True, ""
        except GGUFError as exc:
            info, usable, reason = None, False, str(exc)
            log.warning("model %s is unusable: %s", path, reason)
        log.debug("read %s in %.3fs", path, time.monotonic() - started)
        info_json = json.dumps(info.to_dict()) if info else None
        with self._lock:
            self._db.execute(
                "INSERT INTO models"
                " (id, path, size, mtime, usable, reason, info, source, scanned_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(path) DO UPDATE SET"
                " size = excluded.size, mtime = excluded.mtime, usable = excluded.usable,"
                " reason = excluded.reason, info = excluded.info, scanned_at = excluded.scanned_at,"
                " source = CASE WHEN excluded.source = 'scan' THEN models.source"
                " ELSE excluded.source END",
                (model_id, str(path), st.st_size, st.st_mtime, int(usable), reason,
                 info_json, source, time.time()),
            )
        return self._row_entry(model_id, str(path), st.st_size, st.st_mtime, int(usable), reason,
                               info_json, source), True

    def _free_id(self, base: str, path: str) -> str:
        model_id, n = base, 2
        while True:
            row = self._db.execute("SELECT path FROM models WHERE id = ?", (model_id,)).fetchone()
            if row is None or row[0] == path:
                return model_id
            model_id, n = f"{base}-{n}", n + 1

    @staticmethod
    def _row_entry(model_id: str, path: str, size: int, mtime: float, usable: int, reason: str,
                   info_json: str | None, source: str) -> ModelEntry:
        info = GGUFInfo.from_dict(json.loads(info_json)) if info_json else None
        return ModelEntry(model_id, path, size, mtime, bool(usable), reason, info, source)

    # --- the default model ----------------------------------------------------------

    def set_default(self, model_id: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('default', ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (model_id,),
            )
            self._reload()

    def default_id(self) -> str | None:
        return self._aliases.get(DEFAULT_ALIAS)

    # --- lookups ----------------------------------------------------------------------

    def _reload(self) -> None:
        rows = self._db.execute(
            "SELECT id, path, size, mtime, usable, reason, info, source FROM models ORDER BY id"
        ).fetchall()
        entries = {r[0]: self._row_entry(*r) for r in rows}
        default = self._db.execute("SELECT value FROM meta WHERE key = 'default'").fetchone()
        aliases: dict[str, str] = {}
        if default and default[0] in entries:
            aliases[DEFAULT_ALIAS] = default[0]
        # A slug of the model's own name is an alias when no other model claims it.
        name_slugs: dict[str, list[str]] = {}
        for e in entries.values():
            if e.info and e.info.name:
                name_slugs.setdefault(slug(e.info.name), []).append(e.id)
        for name, ids in name_slugs.items():
            if len(ids) == 1 and name and name not in entries and name != DEFAULT_ALIAS:
                aliases[name] = ids[0]
        by_id: dict[str, list[str]] = {}
        for alias, target in aliases.items():
            by_id.setdefault(target, []).append(alias)
        self._entries = {
            k: dataclasses.replace(e, aliases=tuple(sorted(by_id.get(k, []))))
            for k, e in entries.items()
        }
        self._aliases = aliases

    def mark_unusable(self, model_id: str, reason: str) -> None:
        """Mark a model unusable (its engine keeps failing); kept until its file changes
        (the next scan reads it again) or ``clear_unusable``."""
        with self._lock:
            self._db.execute("UPDATE models SET usable = 0, reason = ? WHERE id = ?",
                             (reason, model_id))
            self._reload()

    def clear_unusable(self, model_id: str) -> None:
        """Read a model's file again, whatever it was marked."""
        entry = self._entries.get(model_id)
        if entry is None:
            return
        with self._lock:
            self._db.execute("UPDATE models SET size = -1 WHERE id = ?", (model_id,))
        self.register_file(Path(entry.path), entry.source)

    def list(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._entries.values())

    def get(self, model_id: str) -> ModelEntry | None:
        return self._entries.get(model_id)

    def resolve(self, name: str) -> ModelEntry | None:
        """An id or alias to its entry; anything else (paths included) is None."""
        with self._lock:
            if name in self._entries:
                return self._entries[name]
            target = self._aliases.get(name)
            return self._entries.get(target) if target else None
