"""Open a registered model in this process: the one loader of the server and the fallback.

Retry policy: a load that fails with layers on the GPU is tried again with half of them,
then on the CPU alone, since the usual cause (VRAM taken by someone else since the plan
was made, a CUDA allocation that fails) goes away with fewer layers. A load that fails on
the CPU is not retried: the file or the build is at fault, and the error says which.
"""

from __future__ import annotations

import dataclasses
import logging

from ..hardware.planner import OffloadPlan
from ..models.registry import ModelEntry
from .base import EngineError
from .llamacpp import LlamaCppEngine, LlamaCppUnavailable, LoadOptions

log = logging.getLogger("mloffload.engine")


def layer_attempts(n_gpu_layers: int) -> list[int]:
    """The GPU layer counts tried in turn: the plan's, half of it, none."""
    out = [n_gpu_layers]
    if n_gpu_layers > 1:
        out.append(n_gpu_layers // 2)
    if n_gpu_layers > 0:
        out.append(0)
    return out


def open_model(entry: ModelEntry, plan: OffloadPlan, *, n_threads: int, main_gpu: int = 0,
               embedding_memory: int = LoadOptions.embedding_memory
               ) -> tuple[LlamaCppEngine, OffloadPlan]:
    """Load ``entry`` as ``plan`` says, falling back as above; returns the engine and the
    plan it really runs with. Raises LlamaCppUnavailable, or EngineError with the last
    failure."""
    if entry.info is None:
        raise EngineError(f"model {entry.id!r} cannot be used: {entry.reason}")
    error: EngineError | None = None
    for layers in layer_attempts(plan.n_gpu_layers):
        if error is not None:
            log.warning("load of %s failed (%s); retrying with %d GPU layers", entry.id, error,
                        layers)
        try:
            engine = LlamaCppEngine(entry.id, entry.info, LoadOptions(
                n_ctx=plan.n_ctx, n_threads=n_threads, n_gpu_layers=layers, main_gpu=main_gpu,
                embedding_memory=embedding_memory))
        except LlamaCppUnavailable:
            raise
        except EngineError as exc:
            error = exc
            continue
        if layers != plan.n_gpu_layers:
            plan = dataclasses.replace(plan, n_gpu_layers=layers,
                                       reason=f"{layers} layers after a failed load")
        return engine, plan
    assert error is not None
    raise error
