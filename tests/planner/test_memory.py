"""Memory per device and the largest batch that fits."""

import dataclasses

import pytest

from roofline.planner.formats import get_weight_format
from roofline.planner.hardware import hardware_presets
from roofline.planner.layout import Layout, Placement
from roofline.planner.memory import max_batch, memory_needed, weight_bytes_per_device
from roofline.planner.model_presets import model_presets

BF16 = get_weight_format("bf16")
LLAMA_8B = model_presets()["llama-3.1-8b"]
LLAMA_70B = model_presets()["llama-3.1-70b"]
H100 = hardware_presets()["h100"]


def test_single_device_breakdown_by_hand():
    layout = Layout(BF16, "bf16")
    memory = memory_needed(LLAMA_8B, H100, layout, batch=4, context=4096)
    assert memory.weights == pytest.approx(LLAMA_8B.weight_bytes(BF16))
    assert memory.kv_cache == 4 * 4096 * 128 * 1024
    assert memory.reserved == H100.reserved_bytes and memory.fits


def test_tensor_parallel_splits_weights_and_kv():
    one = memory_needed(LLAMA_70B, H100, Layout(BF16, "bf16", tp=1), 8, 4096)
    four = memory_needed(LLAMA_70B, H100, Layout(BF16, "bf16", tp=4), 8, 4096)
    assert four.weights == pytest.approx(one.weights / 4, rel=0.01)
    assert four.kv_cache == pytest.approx(one.kv_cache / 4)
    # 8 KV heads over tp=16 ranks: each rank still holds one head.
    sixteen = Layout(BF16, "bf16", tp=16)
    assert memory_needed(LLAMA_70B, H100, sixteen, 8, 4096).kv_cache == pytest.approx(one.kv_cache / 8)


def test_pipeline_stage_holds_its_layers():
    two = weight_bytes_per_device(LLAMA_70B, Layout(BF16, "bf16", pp=2))
    assert two == pytest.approx(LLAMA_70B.weight_bytes(BF16) / 2, rel=0.02)


def test_max_batch_is_the_boundary():
    layout = Layout(BF16, "bf16")
    fit = max_batch(LLAMA_8B, H100, layout, 8192)
    assert fit > 0
    assert memory_needed(LLAMA_8B, H100, layout, fit, 8192).fits
    assert not memory_needed(LLAMA_8B, H100, layout, fit + 1, 8192).fits
    assert max_batch(LLAMA_70B, H100, layout, 4096) == 0  # 141 GB of weights on 80 GB


@pytest.mark.parametrize("memory_gb", [16, 24, 40, 80, 141, 192])
def test_more_memory_never_shrinks_the_batch(memory_gb):
    layout = Layout(get_weight_format("int4"), "bf16")
    smaller = dataclasses.replace(H100, memory_bytes=memory_gb * 1e9)
    larger = dataclasses.replace(H100, memory_bytes=(memory_gb + 8) * 1e9)
    assert max_batch(LLAMA_8B, larger, layout, 4096) >= max_batch(LLAMA_8B, smaller, layout, 4096)


def test_quantization_never_shrinks_the_batch():
    batches = [max_batch(LLAMA_8B, H100, Layout(get_weight_format(name), "bf16"), 4096)
               for name in ("fp32", "bf16", "fp8", "int4")]
    assert batches == sorted(batches)


def test_offload_moves_weights_to_host():
    placement = Placement(weights_on_device=0.5, weights_on_host=0.5, kv_on_device=0.0)
    memory = memory_needed(LLAMA_70B, H100, Layout(BF16, "bf16", placement=placement), 8, 4096)
    assert memory.weights < LLAMA_70B.weight_bytes(BF16) * 0.6
    assert memory.kv_cache == 0
    assert memory.host == pytest.approx(LLAMA_70B.weight_bytes(BF16) / 2 + 8 * 4096 * 320 * 1024, rel=0.01)
