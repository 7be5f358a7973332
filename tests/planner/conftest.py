"""Planner fixtures: a calibrated runtime's costs with round numbers, and a CPU that carries them."""

import dataclasses

import pytest

from roofline.planner.eager import RuntimeCosts
from roofline.planner.hardware import HardwareSpec, hardware_presets


@pytest.fixture
def rc() -> RuntimeCosts:
    """Eager-runtime costs with round numbers, for hand arithmetic: float and int4 layers, no int8 layers."""
    return RuntimeCosts(
        dtype="fp32",
        layer_curves={
            "float": ((512, ((1.0, 1e10), (64.0, 1e11), (512.0, 2e11))), (2048, ((1.0, 2e10), (512.0, 4e11)))),
            "int4": ((512, ((1.0, 4e10), (512.0, 1.5e11))),),
        },
        head_curves={"float": ((512, ((1.0, 5e9), (512.0, 1e11))), (2048, ((1.0, 5e9), (512.0, 1e11)))),
                     "int8": ((512, ((1.0, 2e10), (512.0, 2e11))),)},
        layer_dispatch_s=100e-6, element_s=2e-10, decode_attention_s=50e-6, decode_kv_bandwidth=5e9,
        prefill_attention_s=80e-6, prefill_attention_unit_s=6e-11, sample_row_s=20e-6, sample_logit_s=1e-9,
        schedule_step_s=300e-6, schedule_sequence_s=40e-6,
        chunk_tokens=512)


@pytest.fixture
def local(rc: RuntimeCosts) -> HardwareSpec:
    """A CPU with 20 GB/s, 200 GFLOP/s fp32 and the runtime costs above (as a calibrated profile gives)."""
    return dataclasses.replace(hardware_presets()["cpu"], memory_bandwidth=20e9, flops={"fp32": 2e11},
                               layer_overhead_s=rc.layer_dispatch_s, runtime=rc)
