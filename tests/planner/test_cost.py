"""Roofline step costs and predictions against hand arithmetic."""

import dataclasses

import pytest

from roofline.planner.cost import arithmetic_intensity, crossover_batch, decode_stage_cost, prefill_cost
from roofline.planner.formats import get_weight_format
from roofline.planner.hardware import hardware_presets
from roofline.planner.layout import Layout, Placement, Workload
from roofline.planner.model_presets import model_presets
from roofline.planner.predict import predict, predict_rates

BF16 = get_weight_format("bf16")
LLAMA_8B = model_presets()["llama-3.1-8b"]
LLAMA_70B = model_presets()["llama-3.1-70b"]
H100 = hardware_presets()["h100"]
A100 = hardware_presets()["a100-40gb"]
NO_OVERHEAD_H100 = dataclasses.replace(H100, layer_overhead_s=0.0)


def test_crossover_batch_is_the_ridge_point_for_bf16():
    a100 = dataclasses.replace(A100, memory_bandwidth=1.5e12)
    crossover = crossover_batch(LLAMA_8B, a100, Layout(BF16, "bf16"))
    assert crossover == pytest.approx(312e12 / 1.5e12, rel=0.02)  # ~208
    # Long contexts add KV reads per sequence: the crossover moves out, or never comes.
    assert crossover_batch(LLAMA_8B, a100, Layout(BF16, "bf16"), context=512) > crossover
    assert crossover_batch(LLAMA_8B, a100, Layout(BF16, "bf16"), context=32768) is None


def test_batch_one_decode_is_weight_reads():
    step = decode_stage_cost(LLAMA_8B, NO_OVERHEAD_H100, Layout(BF16, "bf16"), batch=1, context=1)
    read_bytes = LLAMA_8B.decode_read_params() * 2
    assert step.time_s == pytest.approx(read_bytes / 3.35e12, rel=0.001)
    assert step.bound == "memory" and step.dominant_term()[0] == "weight reads"
    assert arithmetic_intensity(LLAMA_8B, Layout(BF16, "bf16"), 1, 1) == pytest.approx(1.0, rel=0.01)


def test_large_batch_decode_is_compute_bound():
    step = decode_stage_cost(LLAMA_8B, NO_OVERHEAD_H100, Layout(BF16, "bf16"), batch=2048, context=1)
    assert step.bound == "compute"
    assert step.compute_s == pytest.approx(2048 * LLAMA_8B.decode_flops_per_token(1) / 989e12)


def test_tensor_parallel_divides_reads_and_adds_communication():
    one = decode_stage_cost(LLAMA_70B, H100, Layout(BF16, "bf16", tp=1), 8, 2048)
    four = decode_stage_cost(LLAMA_70B, H100, Layout(BF16, "bf16", tp=4), 8, 2048)
    assert four.weight_read_s == pytest.approx(one.weight_read_s / 4, rel=0.01)
    assert one.comm_s == 0 and four.comm_s > 0
    # 2 all-reduces x 80 layers x (latency + 2*3/4 * 8*8192*2 bytes / 450 GB/s)
    expected = 2 * 80 * (8e-6 + 1.5 * 8 * 8192 * 2 / 450e9)
    assert four.comm_s == pytest.approx(expected)


def test_prefill_is_compute_bound_and_quadratic_in_attention():
    step = prefill_cost(LLAMA_8B, H100, Layout(BF16, "bf16"), 1, 4096)
    assert step.bound == "compute"
    assert step.compute_s == pytest.approx(LLAMA_8B.prefill_flops(4096) / 989e12)


def test_offloaded_weights_stream_over_the_host_link():
    placement = Placement(weights_on_device=0.0, weights_on_host=1.0)
    step = decode_stage_cost(LLAMA_70B, H100, Layout(BF16, "bf16", placement=placement), 64, 1024)
    assert step.bound == "transfer"
    assert step.host_link_s == pytest.approx(LLAMA_70B.decode_read_params() * 2 / 64e9, rel=0.001)
    disk = Placement(weights_on_device=0.5, weights_on_disk=0.5)
    disk_step = decode_stage_cost(LLAMA_70B, H100, Layout(BF16, "bf16", placement=disk), 64, 1024)
    assert disk_step.disk_s == pytest.approx(LLAMA_70B.decode_read_params() / 2e9, rel=0.001)


def test_prediction_rates_and_price():
    workload = Workload(prompt_len=1024, output_len=256)
    layout = Layout(BF16, "bf16", tp=4, replicas=2)
    p = predict(LLAMA_70B, H100, layout, workload, batch=16)
    assert p.decode_tok_s == pytest.approx(2 * 16 / p.tpot_s)
    assert p.throughput_tok_s < p.decode_tok_s  # prefill time is amortized in
    assert p.usd_per_mtok == pytest.approx(8 * 4.50 / 3600 / p.throughput_tok_s * 1e6)
    assert p.ttft_s == pytest.approx(p.prefill_s + p.tpot_s)


def test_pipeline_parallel_tpot_visits_every_stage():
    workload = Workload(prompt_len=1024, output_len=256)
    one = predict(LLAMA_70B, H100, Layout(BF16, "bf16", tp=2), workload, batch=1)
    two = predict(LLAMA_70B, H100, Layout(BF16, "bf16", tp=2, pp=2), workload, batch=1)
    assert two.tpot_s == pytest.approx(one.tpot_s, rel=0.1)  # same weights read, one stage at a time


def test_predict_rates_for_the_default_model_on_a_cpu():
    cpu = dataclasses.replace(hardware_presets()["cpu"], memory_bandwidth=12.7e9,
                              flops={"fp32": 1e11}, layer_overhead_s=0.0)
    spec = model_presets()["smollm2-135m"]
    rates = predict_rates(spec, cpu, batch=1, prompt_len=128)
    assert rates.decode_bound == "memory"
    kv_bytes = 128 * spec.kv_bytes_per_token(4)
    assert rates.decode_tok_s == pytest.approx(12.7e9 / (spec.decode_read_params() * 4 + kv_bytes), rel=0.001)
    assert rates.prefill_bound == "compute"
    batched = predict_rates(spec, cpu, batch=64, prompt_len=128)
    assert batched.decode_tok_s > 10 * rates.decode_tok_s  # weights are read once per step


def test_worked_example_in_docs():
    """docs/planner.md: llama-3.1-70b, bf16, tp=4 on H100s, prompt 3840 + output 256, batch 64."""
    from roofline.planner.memory import max_batch, memory_needed

    layout, workload = Layout(BF16, "bf16", tp=4), Workload(3840, 256)
    memory = memory_needed(LLAMA_70B, H100, layout, 64, workload.context)
    assert memory.weights == pytest.approx(35.28e9, rel=1e-3)
    assert memory.kv_cache == pytest.approx(21.47e9, rel=1e-3)
    assert memory.total == pytest.approx(59.44e9, rel=1e-3)
    assert max_batch(LLAMA_70B, H100, layout, workload.context) == 125
    p = predict(LLAMA_70B, H100, layout, workload, batch=64)
    step = p.decode_step
    assert (step.weight_read_s, step.kv_read_s, step.compute_s, step.comm_s, step.overhead_s) == pytest.approx(
        (10.37e-3, 6.21e-3, 2.42e-3, 1.84e-3, 0.8e-3), rel=2e-3)
    assert p.tpot_s == pytest.approx(19.22e-3, rel=1e-3) and p.decode_tok_s == pytest.approx(3329, rel=1e-3)
    assert p.prefill_s == pytest.approx(173.4e-3, rel=1e-3) and p.ttft_s == pytest.approx(192.6e-3, rel=1e-3)
    assert p.throughput_tok_s == pytest.approx(1027, rel=1e-3)
    assert p.usd_per_mtok == pytest.approx(4.87, rel=1e-3)


def test_measured_matmul_curve_sets_compute_and_kv_adds():
    curve = ((1.0, 1e10), (16.0, 8e10), (512.0, 2e11))
    cpu = dataclasses.replace(hardware_presets()["cpu"], memory_bandwidth=20e9, flops={"fp32": 2e11},
                              layer_overhead_s=1e-4, prefill_layer_overhead_s=2e-4,
                              matmul_curve={"fp32": curve})
    spec = model_presets()["smollm2-135m"]
    layout = Layout(get_weight_format("fp32"), "fp32")
    step = decode_stage_cost(spec, cpu, layout, batch=4, context=128)
    assert step.is_kv_serial
    flops = 4 * (spec.matmul_flops_per_token + spec.attention_flops(128) + spec.lm_head_flops)
    assert step.compute_s == pytest.approx(flops / cpu.matmul_rate("fp32", 4))
    assert step.overhead_s == pytest.approx(spec.num_layers * 1e-4)
    assert step.time_s == pytest.approx(max(step.weight_read_s, step.compute_s) + step.kv_read_s + step.overhead_s)
    prefill = prefill_cost(spec, cpu, layout, num_prompts=8, prompt_len=128)  # one chunk of 1024 rows
    assert prefill.compute_s == pytest.approx(8 * spec.prefill_flops(128) / 2e11)
    assert prefill.overhead_s == pytest.approx(spec.num_layers * 2e-4)
    # Without a curve (presets, old profiles) the roofline overlaps KV reads with compute as before.
    plain = decode_stage_cost(spec, dataclasses.replace(cpu, matmul_curve=None), layout, batch=4, context=128)
    assert not plain.is_kv_serial and plain.compute_s == pytest.approx(flops / 2e11)
    assert plain.time_s == pytest.approx(max(plain.memory_s, plain.compute_s) + plain.overhead_s)
