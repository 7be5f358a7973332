"""Choosing a placement within a memory limit, with the planner's cost model (the one `roofline plan` uses)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import psutil

from roofline.config import ModelConfig, OffloadConfig
from roofline.errors import ConfigError
from roofline.offload.placement import LayerPlacement, Tier, parse_placement
from roofline.planner.formats import WeightFormat, get_weight_format
from roofline.planner.hardware import HardwareSpec, get_preset_hardware
from roofline.planner.layout import Layout, Placement, Workload
from roofline.planner.memory import MemoryBreakdown, memory_needed
from roofline.planner.model_spec import spec_from_config
from roofline.planner.predict import predict, runtime_kv_format
from roofline.planner.search import Objective, PlanRequest, best_plan_for_layout, candidate_placements, score
from roofline.planner.units import format_bytes

logger = logging.getLogger("roofline")

# The limit covers the model's weights, buffers, KV cache and activations; the interpreter, torch and the
# allocator's slack sit outside it (the limit is for what grows with the model, not the runtime's floor).
RESERVED_BYTES = 0


@dataclass(frozen=True)
class OffloadPlan:
    """The placement the engine runs, what the planner predicts of it, and the KV budget left in the limit."""

    placement: LayerPlacement
    predicted_tok_s: float  # the planner's throughput at `batch` (output tokens/s)
    batch: int  # sequences the prediction is for
    kv_bytes: int | None  # KV cache budget inside the limit; None: no limit given (the usual rule applies)
    memory: MemoryBreakdown | None  # the planner's device memory at `batch`
    hardware: str  # the HardwareSpec the prediction used

    def describe(self) -> str:
        """One start-up line, e.g. 'w0/0/100 kv100/0, predicted 3.1 tok/s at batch 4 (hardware local)'."""
        return (f"offload {self.placement.describe()}: predicted {self.predicted_tok_s:.2f} tok/s at batch "
                f"{self.batch} (hardware {self.hardware})")


def engine_hardware(is_cuda: bool, memory_limit: int) -> HardwareSpec:
    """The calibrated local profile when there is one (`roofline calibrate`), else a preset, capped at the limit."""
    from roofline.planner.profile import default_profile_path, load_profile

    if default_profile_path().is_file():
        hw = load_profile().to_hardware()
        name = "local"
    else:
        hw = get_preset_hardware("a10g" if is_cuda else "cpu")
        name = f"{hw.name} preset (run `roofline calibrate` for this machine's rates)"
    # host-tier weights sit in RAM outside the limit (pinned with a GPU, the page cache without one)
    host = float(psutil.virtual_memory().available)
    return replace(hw, name=name, memory_bytes=float(memory_limit), reserved_bytes=RESERVED_BYTES,
                   host_memory_bytes=max(hw.host_memory_bytes, host))


def _workload(model_config: ModelConfig, max_model_len: int | None) -> Workload:
    context = min(max_model_len or model_config.max_position_embeddings, model_config.max_position_embeddings)
    output_len = max(1, context // 4)
    return Workload(prompt_len=max(1, context - output_len), output_len=output_len)


def _layout(hw: HardwareSpec, fmt: WeightFormat, placement: Placement) -> Layout:
    return Layout(fmt, runtime_kv_format(hw, fmt), placement=placement)


def _kv_budget(memory: MemoryBreakdown, limit: int, kv_memory: int | None) -> int:
    """Everything the limit holds beyond weights, buffers and activations goes to the KV cache."""
    room = int(limit - memory.weights - memory.activations - memory.reserved)
    return room if kv_memory is None else min(kv_memory, room)


def plan_offload(model_config: ModelConfig, fmt: WeightFormat, config: OffloadConfig, is_cuda: bool,
                 max_model_len: int | None, max_num_seqs: int, kv_memory: int | None) -> OffloadPlan | None:
    """The placement to run under `config`, or None when nothing is limited or offloaded."""
    n = model_config.num_layers
    if config.offload == "none" or (config.offload == "auto" and config.memory_limit is None):
        return None
    spec = spec_from_config(model_config, native_format=fmt)
    workload = _workload(model_config, max_model_len)
    limit = config.memory_limit
    if config.offload != "auto":
        placement = parse_placement(config.offload, n)
        if placement.kv_on_device < 1.0:
            raise ConfigError("offload: KV blocks in host RAM are not supported yet; use kv=100/0")
        # without a limit the prediction is for the memory available now, and the usual KV rule applies
        hw = engine_hardware(is_cuda, limit if limit is not None else int(psutil.virtual_memory().available))
        layout = _layout(hw, fmt, placement.fractions())
        memory = memory_needed(spec, hw, layout, 1, workload.context)
        if not memory.fits:
            raise ConfigError(f"offload {config.offload} needs {format_bytes(memory.total)} for one "
                              f"sequence of {workload.context} tokens; the memory limit is {format_bytes(hw.memory_bytes)}")
        plan = best_plan_for_layout(spec, hw, layout, _request(workload, max_num_seqs))
        kv_bytes = None if limit is None else _kv_budget(plan.memory, limit, kv_memory)
        return OffloadPlan(placement, plan.prediction.throughput_tok_s, plan.batch, kv_bytes, plan.memory, hw.name)
    hw = engine_hardware(is_cuda, limit)
    request = _request(workload, max_num_seqs)
    best = None
    for fractions in candidate_placements(hw):
        placement = LayerPlacement.from_fractions(fractions, n)
        if placement.kv_on_device < 1.0:
            continue  # the runtime keeps every KV block on the device
        # score the placement as the runtime rounds it to whole layers
        plan = best_plan_for_layout(spec, hw, _layout(hw, fmt, placement.fractions()), request)
        if plan is not None and (best is None or score(plan.prediction, plan.layout, request)
                                 < score(best[1].prediction, best[1].layout, request)):
            best = (placement, plan)
    if best is None:
        everything_off = Placement(0.0, 0.0 if not is_cuda else 1.0, 1.0 if not is_cuda else 0.0)
        need = memory_needed(spec, hw, _layout(hw, fmt, everything_off), 1, workload.context).total
        raise ConfigError(f"the model needs at least {format_bytes(need)} even with every layer offloaded "
                          f"(embedding, head, two layer buffers, one {workload.context}-token sequence's KV "
                          f"cache and activations); --memory-limit is {format_bytes(limit)}")
    placement, plan = best
    return OffloadPlan(placement, plan.prediction.throughput_tok_s, plan.batch,
                       _kv_budget(plan.memory, limit, kv_memory), plan.memory, hw.name)


def plan_for_source(source, model_config: ModelConfig, config: OffloadConfig, dtype_name: str, is_quantized: bool,
                    is_cuda: bool, max_model_len: int | None, max_num_seqs: int,
                    kv_memory: int | None) -> OffloadPlan | None:
    """What the engine plans for a model source (its metadata only): the one function behind both
    `roofline generate --memory-limit` (at load) and `roofline plan --memory-limit` (without loading)."""
    from roofline.planner.model_source import native_format

    fmt = runtime_format(dtype_name, native_format(source), is_quantized)
    return plan_offload(model_config, fmt, config, is_cuda, max_model_len, max_num_seqs, kv_memory)


def predict_placement(model_config: ModelConfig, fmt: WeightFormat, placement: LayerPlacement, memory_limit: int,
                      is_cuda: bool, workload: Workload, batch: int) -> float:
    """The planner's output tok/s for `placement` at `batch` on `workload` (what a benchmark compares with)."""
    hw = engine_hardware(is_cuda, memory_limit)
    spec = spec_from_config(model_config, native_format=fmt)
    return predict(spec, hw, _layout(hw, fmt, placement.fractions()), workload, batch).throughput_tok_s


def _request(workload: Workload, max_num_seqs: int) -> PlanRequest:
    return PlanRequest(workload=workload, objective=Objective.THROUGHPUT, max_batch=max_num_seqs)


def runtime_format(dtype_name: str, native: WeightFormat | None, is_quantized: bool) -> WeightFormat:
    """The weight format the engine will run: a quantized checkpoint's own, else the activation dtype."""
    if is_quantized and native is not None:
        return native
    return get_weight_format({"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype_name])


__all__ = ["OffloadPlan", "Tier", "engine_hardware", "plan_for_source", "plan_offload", "runtime_format"]
