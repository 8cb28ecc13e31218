"""How many requests an upstream takes: its slots work, up to ``max_queue`` more wait in
it, and past that a 429, as the in-process backend does. Slots come from its ``/props``."""

from __future__ import annotations

import time

from ..errors import APIError
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
