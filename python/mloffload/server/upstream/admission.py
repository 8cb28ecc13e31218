"""How many requests an upstream takes: its slots work, up to ``max_queue`` more wait in
it, and past that a 429, as the in-process backend does. Slots come from its ``/props``."""

from __future__ import annotations

import time

from starlette.requests import Request

from ..backend import unless_disconnected
from ..errors import APIError
from ..slots import SlotGate
from ..stats import Outcome


class Admission:
    def __init__(self, label: str, max_queue: int, slots: int = 1) -> None:
        self.label = label
        self.max_queue = max_queue
        self.slots = slots
        self.in_flight = 0
        self.job_seconds = 1.0  # moving average of a request's time, for Retry-After

    @property
    def waiting(self) -> int:
        return max(0, self.in_flight - self.slots)

    def take(self) -> AdmissionTurn:
        """Count a request in, or refuse it with a 429 when the queue is full."""
        waiting = self.in_flight - self.slots
        if waiting >= self.max_queue:
            retry = max(1, round((waiting + 1) * self.job_seconds / self.slots))
            raise APIError(
                429, f"{self.label} is busy: {self.slots} slot(s) working and {waiting} "
                f"request(s) waiting (max_queue {self.max_queue}); retry later.",
                code="rate_limit_exceeded", headers={"Retry-After": str(retry)})
        self.in_flight += 1
        return AdmissionTurn(self)


class AdmissionTurn:
    __slots__ = ("admission", "ended", "started")

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.started = time.monotonic()
        self.ended = False

    def end(self, outcome: Outcome) -> None:
        if self.ended:
            return
        self.ended = True
        a = self.admission
        a.in_flight -= 1
        if outcome is Outcome.COMPLETED:
            a.job_seconds += 0.2 * (time.monotonic() - self.started - a.job_seconds)


class InFlightLimit(Admission):
    """An Admission that holds requests here, too: no more than ``limit`` are at the upstream
    at once, up to ``max_queue`` more wait here in arrival order, and past that a 429.
    ``limit`` None: no limit (the upstream queues or batches as it likes), never a 429."""

    def __init__(self, label: str, max_queue: int, limit: int | None) -> None:
        super().__init__(label, max_queue, limit or 1)
        self.gate = SlotGate(limit) if limit else None

    @property
    def limit(self) -> int | None:
        return self.gate.slots if self.gate is not None else None

    @limit.setter
    def limit(self, value: int) -> None:
        """A limit learnt later (the slots the upstream reports); waiters keep their place."""
        self.slots = value
        if self.gate is None:
            self.gate = SlotGate(value)
        else:
            self.gate.slots = value

    @property
    def waiting(self) -> int:
        return self.gate.waiting if self.gate is not None else 0

    @property
    def load(self) -> float:
        """How busy it is, relative to its size: requests here (working and waiting) per slot."""
        return self.in_flight / (self.limit or 1)

    async def enter(self, request: Request) -> AdmissionTurn:
        """This request's turn at the upstream, once a place is free (429 when the queue is
        full; a client that leaves while waiting gives its place up)."""
        gate = self.gate
        if gate is None:
            self.in_flight += 1
            return AdmissionTurn(self)
        if gate.locked() and gate.waiting >= self.max_queue:
            self.take_refused()
        self.in_flight += 1
        try:
            await unless_disconnected(request, gate.acquire())
        except BaseException:
            self.in_flight -= 1
            raise
        return HeldTurn(self, gate)

    def take_refused(self) -> None:
        waiting = self.waiting
        retry = max(1, round((waiting + 1) * self.job_seconds / self.slots))
        raise APIError(
            429, f"{self.label} is busy: {self.slots} request(s) at it (max_in_flight "
            f"{self.slots}) and {waiting} waiting here (max_queue {self.max_queue}); retry "
            "later.", code="rate_limit_exceeded", headers={"Retry-After": str(retry)})


class HeldTurn(AdmissionTurn):
    __slots__ = ("gate",)

    def __init__(self, admission: Admission, gate: SlotGate) -> None:
        super().__init__(admission)
        self.gate = gate

    def end(self, outcome: Outcome) -> None:
        if not self.ended:
            self.gate.release()
        super().end(outcome)
