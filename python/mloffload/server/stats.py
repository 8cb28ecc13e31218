"""Counters for `/status` and Prometheus metrics for `/metrics`, kept in one place.

Each app has its own Prometheus registry (several servers can live in one test process).
Inference requests (chat, completions, embeddings) end in exactly one outcome:
completed, failed, cancelled or rejected; `/status` shows those counters.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from ..hardware.gpu import GPUSnapshot


class Outcome(enum.StrEnum):
    """How an inference request ended: exactly one of these, counted once."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclasses.dataclass
class Counts:
    active: int = 0
    queued: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    rejected: int = 0
    tokens_generated: int = 0
    prompt_tokens: int = 0

    @property
    def total(self) -> int:
        return self.active + self.completed + self.failed + self.cancelled + self.rejected


class _GPUCollector(Collector):
    def __init__(self, snapshot: Callable[[], GPUSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[GaugeMetricFamily]:
        snap = self._snapshot()
        used = GaugeMetricFamily("mloffload_vram_used_bytes", "GPU memory in use", labels=["gpu"])
        free = GaugeMetricFamily("mloffload_vram_free_bytes", "GPU memory free", labels=["gpu"])
        total = GaugeMetricFamily("mloffload_vram_total_bytes", "GPU memory", labels=["gpu"])
        avail = GaugeMetricFamily("mloffload_gpu_available", "1 when NVML sees a GPU")
        avail.add_metric([], 1.0 if snap.available else 0.0)
        for g in snap.gpus:
            used.add_metric([str(g.index)], g.used_bytes)
            free.add_metric([str(g.index)], g.free_bytes)
            total.add_metric([str(g.index)], g.total_bytes)
        yield from (avail, used, free, total)


class Stats:
    def __init__(self, gpu_snapshot: Callable[[], GPUSnapshot]) -> None:
        self.counts = Counts()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("mloffload_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.outcomes = Counter("mloffload_inference_requests",
                                "Inference requests by outcome", ["outcome"], registry=r)
        self.tokens = Counter("mloffload_tokens_generated", "Completion tokens generated",
                              registry=r)
        self.prompt = Counter("mloffload_prompt_tokens", "Prompt tokens processed", registry=r)
        self.ttft = Histogram("mloffload_time_to_first_token_seconds",
                              "Time from request to first streamed token", ["route"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("mloffload_request_duration_seconds",
                                  "Request duration", ["route"], buckets=_LATENCY_BUCKETS,
                                  registry=r)
        self.queue = Gauge("mloffload_queue_depth", "Requests waiting for a model", registry=r)
        self.queue_wait = Histogram("mloffload_queue_wait_seconds",
                                    "Time from arrival to a model's slot (queue and load)",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.active = Gauge("mloffload_requests_active", "Requests being served", registry=r)
        self.loaded = Gauge("mloffload_models_loaded", "Models loaded", registry=r)
        self.engine_crashes = Counter("mloffload_engine_crashes",
                                      "Engines that died by themselves, per model", ["model"],
                                      registry=r)
        self.engine_restarts = Counter("mloffload_engine_restarts",
                                       "Engines started again after a crash, per model",
                                       ["model"], registry=r)
        self.load_seconds = Histogram("mloffload_model_load_seconds", "Model load time",
                                      buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
                                      registry=r)
        r.register(_GPUCollector(gpu_snapshot))

    # inference bookkeeping -------------------------------------------------------------

    def enqueue(self) -> None:
        self.counts.queued += 1
        self.queue.set(self.counts.queued)

    def dequeue(self) -> None:
        self.counts.queued -= 1
        self.queue.set(self.counts.queued)

    def begin(self) -> None:
        self.counts.active += 1
        self.active.set(self.counts.active)

    def end(self, outcome: Outcome, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        self.counts.active -= 1
        self.active.set(self.counts.active)
        self.record(outcome, prompt_tokens, completion_tokens)

    def record(self, outcome: Outcome, prompt_tokens: int = 0, completion_tokens: int = 0
               ) -> None:
        setattr(self.counts, outcome.value, getattr(self.counts, outcome.value) + 1)
        self.outcomes.labels(outcome).inc()
        if completion_tokens:
            self.counts.tokens_generated += completion_tokens
            self.tokens.inc(completion_tokens)
        if prompt_tokens:
            self.counts.prompt_tokens += prompt_tokens
            self.prompt.inc(prompt_tokens)

    def status(self) -> dict[str, Any]:
        c = self.counts
        return {
            "total": c.total,
            "active": c.active,
            "queued": c.queued,
            "completed": c.completed,
            "failed": c.failed,
            "cancelled": c.cancelled,
            "rejected": c.rejected,
            "tokens_generated": c.tokens_generated,
            "prompt_tokens": c.prompt_tokens,
        }

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))
