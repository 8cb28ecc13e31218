"""Every request the plugin makes gets its id here (one counter for chats, edits, status,
embeddings and model lists) and its ``User MLOffloadRequestStarted/Finished`` events."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from .bridge import Bridge


@dataclasses.dataclass(frozen=True)
class Ticket:
    id: int
    kind: str
    model: str
    extra: dict[str, Any]


class Requests:
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self._ids = itertools.count(1)

    def start(self, kind: str, model: str, **extra: Any) -> Ticket:
        """On the event loop: a new id, and the started event."""
        ticket = Ticket(next(self._ids), kind, model, extra)
        self.bridge.event("started", {"id": ticket.id, "kind": kind, "model": model, **extra})
        return ticket

    def finish(self, ticket: Ticket, **data: Any) -> None:
        """On the event loop: the finished event (``ok``, ``backend``, ``error``, ...)."""
        self.bridge.event("finished", {"id": ticket.id, "kind": ticket.kind,
                                       "model": ticket.model, **ticket.extra, **data})
