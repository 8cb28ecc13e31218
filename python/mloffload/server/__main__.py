"""``python -m mloffload.server`` / ``ml-offload-server``: start the API."""

from __future__ import annotations

import ipaddress
import logging
import sys
from collections.abc import Sequence

import uvicorn

from ..config import ConfigError, Settings, load_settings
from ..logs import setup_logging
from ..models.catalog import CatalogError

log = logging.getLogger("mloffload.server")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    from ..engine import doctor
    from .mode import resolve_mode

    mode = resolve_mode(settings)
    if mode.backend == "llama-server":
        return ""
    try:
        model = doctor.smoke_model(settings.data_dir)
    except CatalogError as exc:
        return str(exc)
    if mode.backend == "managed":
        assert mode.binary is not None
        check = doctor.check_llama_server(mode.binary, model)
    else:
        check = doctor.check_inprocess(model)
    return "" if check.ok else check.line


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(sys.argv[1:] if argv is None else argv)
        check_bind(settings)
    except ConfigError as exc:
        print(f"ml-offload: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_json)
    try:
        refusal = engine_refusal(settings)
    except ConfigError as exc:
        refusal = str(exc)
    if refusal:
        print(f"ml-offload: {refusal}", file=sys.stderr)
        return 2  # like a configuration error: restarting would not help
    from ..models.catalog import open_registry
    from .app import create_app

    try:
        registry = open_registry(settings)
    except CatalogError as exc:
        print(f"ml-offload: {exc}", file=sys.stderr)
        return 1
    try:
        app = create_app(settings, registry)
        ports = [settings.port] + ([settings.ollama_port] if settings.ollama_port else [])
        # The same app on every port (--ollama-port adds Ollama's); each bound as uvicorn would.
        sockets = [uvicorn.Config(app, host=settings.host, port=port, log_config=None)
                   .bind_socket() for port in ports]
        log.info("ml-offload: default model %s, listening on %s", registry.default_id(),
                 ", ".join(f"http://{settings.host}:{port}" for port in ports))
        server = uvicorn.Server(uvicorn.Config(
            app, host=settings.host, port=settings.port, log_config=None, access_log=False,
            timeout_graceful_shutdown=5))
        server.run(sockets=sockets)
    finally:
        registry.close()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
