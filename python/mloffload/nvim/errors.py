"""Messages for the user, and where the details go instead (the plugin's log)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..engine.base import EngineError
from .client import ClientError
from .options import OptionsError


def log_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "nvim" / "ml-offload.log"


def user_error(exc: BaseException) -> str:
    """A message for the user: ours say what to do; anything else names itself and the log."""
    from .actions import UnknownAction
    from .chat.store import StoreError
    from .fallback import FallbackUnavailable

    if isinstance(exc, ClientError | FallbackUnavailable | EngineError | OptionsError |
                  StoreError | UnknownAction):
        return str(exc)
    return f"internal error ({type(exc).__name__}: {exc}); details in {log_path()}"


def setup_logging(path: Path) -> None:
    logger = logging.getLogger("mloffload")
    if any(getattr(h, "_ml_offload", False) for h in logger.handlers):
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(path)
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler._ml_offload = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the host's stderr is not the user's business
