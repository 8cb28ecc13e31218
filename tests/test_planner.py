"""Offload planner on the real default model's GGUF metadata."""

from __future__ import annotations

from pathlib import Path

import pytest

from mloffload.hardware.planner import compute_buffer_bytes, kv_bytes_per_layer, plan_offload
from mloffload.models.gguf_info import GGUFInfo, read_gguf_info

MiB = 1024**2
MARGIN = 512 * MiB


@pytest.fixture(scope="module")
def info(model_path: Path) -> GGUFInfo:
    return read_gguf_info(model_path)


def test_metadata_used_by_the_planner(info: GGUFInfo) -> None:
    assert info.block_count == 18
    assert len(info.block_bytes) == 18 and all(b > 0 for b in info.block_bytes)
    assert info.token_embd_bytes > 100 * MiB  # 262k vocabulary × 640
    assert info.output_bytes == 0  # tied to the token embedding
    assert info.head_count_kv == 1 and info.key_length == 256 and info.value_length == 256
    assert (sum(info.block_bytes) + info.token_embd_bytes + info.other_bytes
            == info.tensor_bytes_total)


def test_kv_cache_formula(info: GGUFInfo) -> None:
    # n_ctx × (key length + value length) × KV heads × 2 bytes (f16)
    assert kv_bytes_per_layer(info, 4096) == 4096 * (256 + 256) * 1 * 2


def test_zero_free_vram_gives_no_layers(info: GGUFInfo) -> None:
    plan = plan_offload(info, n_ctx=4096, free_vram=0)
    assert plan.n_gpu_layers == 0
    assert plan.gpu_bytes == 0
    assert "no layer fits" in plan.reason


def test_plenty_of_vram_gives_all_layers(info: GGUFInfo) -> None:
    plan = plan_offload(info, n_ctx=4096, free_vram=80 * 1024 * MiB)
    assert plan.n_gpu_layers == plan.max_layers == 19
    assert plan.fits_all
    assert plan.kv_gpu_bytes == plan.kv_bytes_total
    # The tied output head is duplicated onto the GPU; the CPU keeps the embedding.
    assert plan.weights_gpu_bytes == sum(info.block_bytes) + info.token_embd_bytes
    assert plan.weights_cpu_bytes == info.token_embd_bytes + info.other_bytes


def _needed(info: GGUFInfo, k: int, n_ctx: int) -> int:
    """Independent arithmetic: the last k blocks, their KV cache, the compute buffer, margin."""
    weights = sum(info.block_bytes[18 - min(k, 18):])
    if k > 18:
        weights += info.token_embd_bytes
    return (weights + min(k, 18) * kv_bytes_per_layer(info, n_ctx)
            + compute_buffer_bytes(info, n_ctx, k > 18) + MARGIN)


@pytest.mark.parametrize("k", [1, 5, 12, 18])
def test_in_between_gives_the_count_that_fits(info: GGUFInfo, k: int) -> None:
    exact = _needed(info, k, 4096)
    assert plan_offload(info, n_ctx=4096, free_vram=exact).n_gpu_layers == k
    assert plan_offload(info, n_ctx=4096, free_vram=exact - 1).n_gpu_layers < k
    plan = plan_offload(info, n_ctx=4096, free_vram=exact)
    assert plan.gpu_bytes + MARGIN == exact
    assert f"{k} of 19 layers fit" in plan.reason


def test_monotone_in_free_vram(info: GGUFInfo) -> None:
    layers = [plan_offload(info, n_ctx=4096, free_vram=f * MiB).n_gpu_layers
              for f in range(0, 3000, 25)]
    assert layers == sorted(layers)
    assert layers[0] == 0 and layers[-1] == 19
    assert len(set(layers)) > 5


def test_monotone_in_context(info: GGUFInfo) -> None:
    free = 900 * MiB
    layers = [plan_offload(info, n_ctx=n, free_vram=free).n_gpu_layers
              for n in (512, 2048, 8192, 16384, 32768)]
    assert layers == sorted(layers, reverse=True)
    assert layers[0] > layers[-1]


def test_explicit_count_wins(info: GGUFInfo) -> None:
    assert plan_offload(info, n_ctx=4096, free_vram=0, requested=7).n_gpu_layers == 7
    assert plan_offload(info, n_ctx=4096, free_vram=None, requested=-1).n_gpu_layers == 19
    assert plan_offload(info, n_ctx=4096, free_vram=10**12, requested=3).n_gpu_layers == 3
    assert "explicitly" in plan_offload(info, n_ctx=4096, free_vram=0, requested=7).reason


def test_no_gpu_or_no_offload_support_means_cpu(info: GGUFInfo) -> None:
    plan = plan_offload(info, n_ctx=4096, free_vram=None, no_gpu_reason="no GPU here")
    assert plan.n_gpu_layers == 0 and plan.reason == "no GPU here"
    plan = plan_offload(info, n_ctx=4096, free_vram=10**12, offload_supported=False)
    assert plan.n_gpu_layers == 0 and "cannot offload" in plan.reason
