"""``python -m mloffload.server`` / ``ml-offload-server``: start the API."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import uvicorn

from ..config import ConfigError, Settings, load_settings
from ..logs import setup_logging
from ..models.catalog import CatalogError, NotWritable
from .edge import limits_from, protocol_class
from .guard import is_loopback

log = logging.getLogger("mloffload.server")


def check_bind(settings: Settings) -> None:
    """Refuse a non-loopback bind without an API key, unless explicitly allowed."""
    if is_loopback(settings.host) or settings.api_key or settings.allow_unauthenticated:
        return
    raise ConfigError(
        f"refusing to listen on {settings.host} without an API key: anyone who can reach "
        "this address could use the model. Set ML_OFFLOAD_API_KEY (or --api-key-file), "
        "bind 127.0.0.1, or pass --allow-unauthenticated true if you really mean it."
    )


def engine_refusal(settings: Settings) -> str:
    """Why the engine this server would run cannot run here ("" when it can).

    The smoke test (one token, one embedding, in a child process; cached per build) runs
    before anything is served: an engine that dies with an illegal instruction on the first
    chat must stop the start-up with one clear line instead.
    """
    if settings.backend not in ("llamacpp", "auto"):
        return ""
    from ..engine import doctor

    try:
        check = doctor.check_inprocess(doctor.smoke_model(settings.data_dir))
    except CatalogError as exc:
        return str(exc)
    return "" if check.ok else check.line


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(sys.argv[1:] if argv is None else argv)
        check_bind(settings)
    except ConfigError as exc:
        print(f"ml-offload: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_json)
    refusal = engine_refusal(settings)
    if refusal:
        print(f"ml-offload: {refusal}", file=sys.stderr)
        return 2  # like a configuration error: restarting would not help
    from ..models.catalog import open_registry
    from .app import create_app

    try:
        registry = open_registry(settings)
    except CatalogError as exc:
        print(f"ml-offload: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, NotWritable) else 1
    try:
        app = create_app(settings, registry, close_registry=True)
        log.info("ml-offload %s backend, default model %s, listening on http://%s:%d",
                 settings.backend, registry.default_id(), settings.host, settings.port)
        uvicorn.run(app, host=settings.host, port=settings.port, log_config=None,
                    access_log=False, timeout_graceful_shutdown=5,
                    http=protocol_class(limits_from(settings)))
    finally:
        registry.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
