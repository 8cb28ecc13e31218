"""Logging to stderr: one readable line per event, or JSON.

Under systemd, when stderr is the journal (``$JOURNAL_STREAM`` names it), lines carry no
timestamp of their own (the journal adds one) and start with a syslog priority prefix
(``<4>`` for a warning), so ``journalctl -p warning`` filters by level.

Every message is one line of bounded length: control characters in what a line quotes (a
request path, a model name) are escaped, so no client can forge a line of its own, and
a long value is cut (see ``OneLine``).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from typing import Any

import orjson

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
MAX_LOG_MESSAGE = 4096  # characters of one message (and of each string field in JSON)
# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    c = match.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def one_line(text: str, limit: int = MAX_LOG_MESSAGE) -> str:
    """``text`` with control characters escaped, cut to ``limit`` characters."""
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text) - limit} more characters)"
    return _CONTROL.sub(_escape, text)


class OneLine(logging.Filter):
    """Make each record one bounded line: the message, and the string fields JSON shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        safe = one_line(message)
        if safe != message or record.args:
            record.msg, record.args = safe, None
        for key, value in record.__dict__.items():
            if key not in _STANDARD and isinstance(value, str):
                record.__dict__[key] = one_line(value)
        return True


def describe_exception(exc: BaseException) -> str:
    """The kind of an exception and where it was raised, without its message: messages of
    unexpected errors can carry request content (a prompt), which logs must not."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in " \
        f"{frames[-1].name}" if frames else ""
    return f"{type(exc).__name__}{where}"


def log_unexpected(logger: logging.Logger, what: str, exc: BaseException) -> None:
    """An unexpected error: its kind and place at error level, the traceback at debug."""
    logger.error("%s: %s (the traceback is logged at debug level)", what,
                 describe_exception(exc))
    logger.debug("%s", what, exc_info=exc)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


# sd-daemon(3) priorities for the journal's "<N>" line prefix.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        level = max((lv for lv in _PRIORITY if lv <= record.levelno), default=logging.DEBUG)
        return f"<{_PRIORITY[level]}>{super().format(record)}"


def stderr_is_journal() -> bool:
    """True when systemd connected stderr to the journal (``$JOURNAL_STREAM`` is "dev:inode")."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError, AttributeError):
        return False


def setup_logging(level: str = "info", json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json:
        handler.setFormatter(JSONFormatter())
    elif stderr_is_journal():
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               "%Y-%m-%dT%H:%M:%S"))
    handler.addFilter(OneLine())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own access log would duplicate ours.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
