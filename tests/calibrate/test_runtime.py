"""The runtime probes of `roofline calibrate` measure the runtime's own modules and fit sane terms."""

import torch

from roofline.calibrate import runtime as probes
from roofline.calibrate.curves import QUICK_CURVE_WIDTHS
from roofline.planner.eager import RuntimeCosts


def no_sync() -> None:
    pass


def test_measure_runtime_on_the_cpu_gives_positive_costs():
    rc = probes.measure_runtime("cpu", torch.float32, "fp32", 4 << 20, no_sync, repeats=1, budget_s=0.5,
                                widths=QUICK_CURVE_WIDTHS)
    assert isinstance(rc, RuntimeCosts) and rc.dtype == "fp32" and rc.chunk_tokens == 512
    assert set(rc.layer_curves) == {"float", "int8", "int4"} and set(rc.head_curves) == {"float", "int8"}
    assert rc.decode_kv_bandwidth > 0
    for term in (rc.layer_dispatch_s, rc.element_s, rc.decode_attention_s, rc.prefill_attention_s,
                 rc.prefill_attention_unit_s, rc.sample_row_s, rc.sample_logit_s, rc.schedule_step_s,
                 rc.schedule_sequence_s):
        assert term >= 0
    # Dispatching a layer's ~30 ops costs more than nothing and far less than a second.
    assert 0 < rc.layer_dispatch_s + 512 * rc.element_s < 1.0


def test_stubbed_layer_keeps_the_layer_code_path():
    """The elementwise probe swaps matmuls and attention for stubs but runs the real decoder layer."""
    dispatch, element = probes.measure_elementwise("cpu", torch.float32, no_sync, repeats=1, budget_s=0.5)
    assert dispatch >= 0 and element >= 0 and dispatch + element > 0
