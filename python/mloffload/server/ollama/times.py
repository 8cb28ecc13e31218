"""Ollama's time formats: RFC 3339 timestamps and durations in nanoseconds."""

from __future__ import annotations

import datetime as dt
import time

FOREVER = dt.timedelta(microseconds=(2**63 - 1) // 1000)  # Go's largest duration


def _text(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc3339(t: float | None = None) -> str:
    """``t`` (default now) as UTC with microseconds, e.g. ``2025-01-02T03:04:05.678901Z``."""
    return _text(dt.datetime.fromtimestamp(time.time() if t is None else t, dt.UTC))


def expires_at(seconds_left: float | None) -> str:
    """When a model unloads: ``None`` seconds left (or more than Go can say) means never,
    which Ollama shows as the far future."""
    forever = seconds_left is None or seconds_left >= FOREVER.total_seconds()
    left = FOREVER if forever else dt.timedelta(seconds=seconds_left or 0)
    return _text(dt.datetime.now(dt.UTC) + left)


def ns(seconds: float) -> int:
    return max(0, round(seconds * 1e9))
