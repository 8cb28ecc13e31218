"""Offload planner: how many layers of a GGUF model fit in free VRAM.

llama.cpp puts the *last* ``n_gpu_layers`` repeating blocks on the GPU, keeps the token
embedding on the CPU, and moves the output head to the GPU only when ``n_gpu_layers``
exceeds the block count (so ``block_count + 1`` means "everything"). A layer on the GPU
also keeps its KV cache there. The planner adds those sizes from the GGUF tensor table,
estimates llama.cpp's compute buffer, keeps a safety margin, and takes the largest count
that fits.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ..models.gguf_info import GGUFInfo

if TYPE_CHECKING:
    from ..config import Settings
    from .gpu import GPUSnapshot

KV_BYTES_F16 = 2
N_UBATCH = 512
MiB = 1024**2


@dataclasses.dataclass(frozen=True)
class OffloadPlan:
    n_gpu_layers: int
    max_layers: int
    gpu_bytes: int  # weights + KV + compute buffer on the GPU
    cpu_bytes: int  # weights + KV on the CPU
    weights_gpu_bytes: int
    weights_cpu_bytes: int
    kv_bytes_total: int
    kv_gpu_bytes: int
    compute_bytes: int
    margin_bytes: int
    free_vram_bytes: int | None
    n_ctx: int  # per request (slot)
    reason: str
    n_slots: int = 1  # requests decoded at once, each with its own n_ctx of KV cache

    @property
    def fits_all(self) -> bool:
        return self.n_gpu_layers >= self.max_layers

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["fits_all"] = self.fits_all
        return data


def kv_bytes_per_layer(info: GGUFInfo, n_ctx: int, bytes_per_element: int = KV_BYTES_F16) -> int:
    """n_ctx × (key length + value length) × KV heads × bytes per element."""
    return n_ctx * (info.key_length + info.value_length) * info.head_count_kv * bytes_per_element


def compute_buffer_bytes(info: GGUFInfo, n_ctx: int, with_output: bool) -> int:
    """A conservative estimate of llama.cpp's GPU compute buffer for one micro-batch.

    Activations scale with the micro-batch and the model width, attention scores with
    the context and the head count; the logits with the vocabulary, only when the output
    head is on the GPU.
    """
    activations = N_UBATCH * info.embedding_length * 4 * 8
    scores = N_UBATCH * n_ctx * max(info.head_count, 1) * 4 // 4
    logits = N_UBATCH * info.vocab_size * 4 if with_output else 0
    return activations + scores + logits + 64 * MiB


def plan_offload(
    info: GGUFInfo,
    *,
    n_ctx: int,
    free_vram: int | None,
    margin: int = 512 * MiB,
    requested: int | None = None,
    offload_supported: bool = True,
    no_gpu_reason: str = "",
    n_slots: int = 1,
) -> OffloadPlan:
    """Choose ``n_gpu_layers``; ``requested`` (None = auto, -1 = all) is honoured when set.
    The KV cache counted is ``n_slots`` × ``n_ctx``: every slot can use the whole context."""
    blocks = info.block_count
    max_layers = blocks + 1
    output_bytes = info.output_bytes or info.token_embd_bytes  # tied embeddings are duplicated
    kv_layer = kv_bytes_per_layer(info, n_ctx * n_slots)

    def cost(k: int) -> tuple[int, int, int]:
        """(weights on GPU, KV on GPU, compute buffer) with k layers offloaded."""
        if k <= 0:
            return 0, 0, 0
        on_gpu_blocks = min(k, blocks)
        weights = sum(info.block_bytes[blocks - on_gpu_blocks :])
        if k > blocks:
            weights += output_bytes
        return weights, on_gpu_blocks * kv_layer, compute_buffer_bytes(info, n_ctx * n_slots,
                                                                        k > blocks)

    if requested is not None:
        k = max_layers if requested < 0 else min(requested, max_layers)
        reason = f"n_gpu_layers={requested} set explicitly"
        if not offload_supported and k > 0:
            reason += "; this llama.cpp build cannot offload, so it runs on the CPU"
    elif not offload_supported:
        k, reason = 0, no_gpu_reason or "this llama.cpp build cannot offload to a GPU"
    elif free_vram is None:
        k, reason = 0, no_gpu_reason or "no GPU found"
    else:
        budget = free_vram - margin
        k = 0
        for candidate in range(max_layers, 0, -1):
            if sum(cost(candidate)) <= budget:
                k = candidate
                break
        need_all = sum(cost(max_layers)) + margin
        if k == max_layers:
            reason = (f"all {max_layers} layers fit: {_mib(need_all)} MiB needed with margin, "
                      f"{_mib(free_vram)} MiB free")
        elif k == 0:
            reason = (f"no layer fits: {_mib(free_vram)} MiB free, one layer needs "
                      f"{_mib(sum(cost(1)) + margin)} MiB with margin")
        else:
            reason = (f"{k} of {max_layers} layers fit in {_mib(free_vram)} MiB free "
                      f"(all would need {_mib(need_all)} MiB with margin)")

    weights_gpu, kv_gpu, compute = cost(k)
    kv_total = kv_layer * blocks
    # What leaves the CPU: the offloaded blocks, and an untied output head. A tied head is a
    # copy of the token embedding, which stays on the CPU as well.
    moved = sum(info.block_bytes[blocks - min(k, blocks) :]) if k > 0 else 0
    if k > blocks:
        moved += info.output_bytes
    weights_cpu = info.tensor_bytes_total - moved
    return OffloadPlan(
        n_gpu_layers=k,
        max_layers=max_layers,
        gpu_bytes=weights_gpu + kv_gpu + compute,
        cpu_bytes=weights_cpu + kv_total - kv_gpu,
        weights_gpu_bytes=weights_gpu,
        weights_cpu_bytes=weights_cpu,
        kv_bytes_total=kv_total,
        kv_gpu_bytes=kv_gpu,
        compute_bytes=compute,
        margin_bytes=margin,
        free_vram_bytes=free_vram,
        n_ctx=n_ctx,
        reason=reason,
        n_slots=n_slots,
    )


def plan_for_settings(info: GGUFInfo, settings: Settings, snapshot: GPUSnapshot,
                      offload_supported: bool, n_slots: int = 1,
                      ram_available: int | None = None) -> OffloadPlan:
    """The plan for ``settings`` (context, margin, GPU index, requested layers) on the GPU
    ``snapshot`` describes; the server's model manager and the plugin's fallback share it.

    With ``n_slots`` > 1 (an engine process decoding requests together) the slots are cut
    while memory says so: halved until all layers that fit with one slot still fit on the
    GPU, and until the KV cache of the slots kept on the CPU takes at most a quarter of
    ``ram_available``."""
    gpu = snapshot.gpu(settings.gpu) if snapshot.available else None
    if snapshot.available and gpu is None:
        reason = f"GPU {settings.gpu} not found ({len(snapshot.gpus)} GPUs present)"
    else:
        reason = snapshot.reason
    n_ctx = settings.n_ctx
    if info.context_length:
        n_ctx = min(n_ctx, info.context_length)

    def plan(slots: int) -> OffloadPlan:
        return plan_offload(
            info,
            n_ctx=n_ctx,
            free_vram=gpu.free_bytes if gpu else None,
            margin=settings.vram_margin,
            requested=settings.n_gpu_layers,
            offload_supported=offload_supported,
            no_gpu_reason=reason,
            n_slots=slots,
        )

    best = plan(1).n_gpu_layers
    slots = max(1, n_slots)
    while slots > 1:
        candidate = plan(slots)
        kv_cpu = candidate.kv_bytes_total - candidate.kv_gpu_bytes
        fits_ram = ram_available is None or kv_cpu <= ram_available // 4
        if candidate.n_gpu_layers >= best and fits_ram:
            break
        slots //= 2
    chosen = plan(slots)
    if slots < n_slots:
        why = f"{slots} of {n_slots} slots: more would not fit"
        chosen = dataclasses.replace(chosen, reason=f"{chosen.reason}; {why}")
    return chosen


def _mib(n: int) -> int:
    return round(n / MiB)
