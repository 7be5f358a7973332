"""The eager runtime's cost terms (planner/eager.py) and the steps they give, against hand arithmetic."""

import dataclasses
import math

import pytest

from roofline.planner import eager
from roofline.planner.cost import decode_stage_cost, prefill_cost
from roofline.planner.eager import RuntimeCosts
from roofline.planner.formats import get_weight_format
from roofline.planner.hardware import hardware_from_mapping
from roofline.planner.layout import Layout
from roofline.planner.model_presets import model_presets
from roofline.planner.predict import predict_rates

SMOLLM = model_presets()["smollm2-135m"]
FP32 = Layout(get_weight_format("fp32"), "fp32")
def test_curve_interpolates_in_log_rows_and_log_width(rc):
    curve = rc.layer_curves["float"][0][1]
    assert eager.interpolate_curve(curve, 0.5) == 1e10 and eager.interpolate_curve(curve, 4096) == 2e11
    assert eager.interpolate_curve(curve, 8) == pytest.approx(5.5e10)  # halfway from 1 to 64 in log rows
    assert eager.curve_rate(rc.layer_curves["float"], 256, 1) == 1e10  # below the narrowest width: clamped
    assert eager.curve_rate(rc.layer_curves["float"], 8192, 1) == 2e10
    assert eager.curve_rate(rc.layer_curves["float"], 1024, 1) == pytest.approx(1.5e10)  # halfway in log width


def test_activation_elements_of_the_default_model():
    # 10 x 576 (norms, residuals) + 3 x (9 + 3) x 64 (rotary on q and k) + 5 x 1536 (SwiGLU)
    assert eager.activation_elements(576, 1536, 9, 3, 64) == 15744


@pytest.mark.parametrize("num_prompts, prompt_len, expected", [
    (4, 128, (1, 4)),  # four prompts fill one 512-token step
    (64, 128, (16, 79)),  # 15 step boundaries each split a prompt in two
    (1, 1000, (2, 2)),  # a long prompt runs in two chunks
    (3, 1024, (6, 6)),
])
def test_prompt_chunks(num_prompts, prompt_len, expected):
    assert eager.prompt_chunks(num_prompts, prompt_len, 512) == expected


def test_eager_decode_step_by_hand(rc, local):
    batch, context = 64, 142
    step = decode_stage_cost(SMOLLM, local, FP32, batch=batch, context=context)
    layers, width = SMOLLM.num_layers, SMOLLM.hidden_size
    layer_rate = eager.curve_rate(rc.layer_curves["float"], width, batch)
    head_rate = eager.curve_rate(rc.head_curves["float"], width, batch)
    assert step.compute_s == pytest.approx(batch * SMOLLM.matmul_flops_per_token / layer_rate
                                           + batch * SMOLLM.lm_head_flops / head_rate)
    kv_per_token_layer = 2 * 3 * 64 * 4
    assert step.kv_read_s == 0.0
    assert step.attention_s == pytest.approx(layers * (50e-6 + batch * context * kv_per_token_layer / 5e9))
    assert step.elementwise_s == pytest.approx(layers * batch * 15744 * 2e-10)
    assert step.overhead_s == pytest.approx(layers * 100e-6)
    assert step.sampling_s == pytest.approx(batch * (20e-6 + 49152 * 1e-9) + 300e-6 + batch * 40e-6)
    assert step.time_s == pytest.approx(max(step.weight_read_s, step.compute_s) + step.attention_s
                                        + step.elementwise_s + step.overhead_s + step.sampling_s)


def test_eager_prefill_by_hand(rc, local):
    cost = prefill_cost(SMOLLM, local, FP32, num_prompts=4, prompt_len=128)  # one step of 512 tokens
    layers, rows = SMOLLM.num_layers, 512
    matmul = (512 * SMOLLM.matmul_flops_per_token / eager.curve_rate(rc.layer_curves["float"], 576, rows)
              + 4 * SMOLLM.lm_head_flops / eager.curve_rate(rc.head_curves["float"], 576, 4))
    assert cost.compute_s == pytest.approx(matmul)
    assert cost.overhead_s == pytest.approx(layers * 100e-6)
    pairs = 4 * 128 * 129 / 2
    assert cost.attention_s == pytest.approx(layers * (4 * 80e-6 + pairs * 9 * 64 * 6e-11))
    assert cost.elementwise_s == pytest.approx(layers * 512 * 15744 * 2e-10)
    assert cost.sampling_s == pytest.approx(4 * (20e-6 + 49152 * 1e-9) + 300e-6 + 4 * 40e-6)  # one step, 4 chunks
    # Twice the prompts: twice the steps' dispatch, at least twice the time.
    double = prefill_cost(SMOLLM, local, FP32, num_prompts=8, prompt_len=128)
    assert double.overhead_s == pytest.approx(2 * cost.overhead_s) and double.time_s >= 1.99 * cost.time_s


def test_formats_map_to_the_runtime_kernels_that_price_them(rc, local):
    fmt = get_weight_format
    assert rc.kernels(fmt("fp32")) == ("float", "float")
    assert rc.kernels(fmt("bf16")) == (None, None)  # float curves are in fp32 only
    assert rc.kernels(fmt("int4")) == ("int4", "int8") and rc.kernels(fmt("q4_1")) == ("int4", "int8")
    assert rc.kernels(fmt("int8")) == (None, "int8")  # no int8 layer curve in this profile
    assert rc.kernels(fmt("fp8")) == (None, None)
    int4 = decode_stage_cost(SMOLLM, local, Layout(fmt("int4"), "fp32"), batch=4, context=128)
    assert int4.compute_s == pytest.approx(4 * SMOLLM.matmul_flops_per_token / eager.curve_rate(rc.layer_curves["int4"], 576, 4)
                                           + 4 * SMOLLM.lm_head_flops / eager.curve_rate(rc.head_curves["int8"], 576, 4))
    int8 = decode_stage_cost(SMOLLM, local, Layout(fmt("int8"), "fp32"), batch=4, context=128)
    unmeasured = 4 * SMOLLM.matmul_flops_per_token / 2e11  # no curve: the hardware's float rate
    assert int8.compute_s == pytest.approx(unmeasured + 4 * SMOLLM.lm_head_flops / eager.curve_rate(rc.head_curves["int8"], 576, 4))
    assert int8.attention_s > 0 and int8.sampling_s > 0  # the runtime's other costs still apply


def test_search_on_a_calibrated_runtime_tries_its_measured_kernels(local):
    from roofline.planner.layout import Workload
    from roofline.planner.search import PlanRequest, candidate_formats, search

    assert [f.name for f in candidate_formats(SMOLLM, local, None)] == ["fp32", "int4"]
    result = search(SMOLLM, local, PlanRequest(Workload(128, 64), allow_offload=False))
    assert {p.layout.weight_format.name for p in result.plans} == {"fp32", "int4"}
    assert all(p.layout.kv_format == "fp32" for p in result.plans)  # the runtime's activation dtype


def test_decode_time_grows_with_batch_and_context(local):
    times = [decode_stage_cost(SMOLLM, local, FP32, batch=b, context=256).time_s for b in (1, 4, 16, 64, 256)]
    assert times == sorted(times)
    assert (decode_stage_cost(SMOLLM, local, FP32, batch=16, context=4096).time_s
            > decode_stage_cost(SMOLLM, local, FP32, batch=16, context=256).time_s)
    rates = predict_rates(SMOLLM, local, batch=16, prompt_len=128)
    assert rates.decode_term[0] in ("matmul FLOPs", "paged attention") and 0 < rates.decode_term[1] <= 1


def test_runtime_costs_round_trip_through_a_hardware_file(rc):
    raw = dataclasses.asdict(rc)
    assert RuntimeCosts.from_mapping(raw) == rc
    spec = hardware_from_mapping({"base": "cpu", "runtime": raw}, "test")
    assert spec.runtime == rc
    assert math.isclose(decode_stage_cost(SMOLLM, spec, FP32, 1, 128).sampling_s, 20e-6 + 49152e-9 + 340e-6)
