"""Predicted latency, throughput and price of a layout serving a workload at a batch size."""

from __future__ import annotations

import math
from dataclasses import dataclass

from roofline.planner.cost import StepCost, decode_stage_cost, p2p_s, prefill_cost
from roofline.planner.formats import WeightFormat, default_kv_format, get_weight_format
from roofline.planner.hardware import HardwareSpec
from roofline.planner.layout import Layout, Workload
from roofline.planner.model_spec import ModelSpec

SECONDS_PER_HOUR = 3600
TOKENS_PER_PRICE_UNIT = 1e6  # prices are per million output tokens


@dataclass(frozen=True)
class Prediction:
    """What a layout does at one batch size; rates summed over replicas."""

    batch: int  # concurrent sequences per replica
    prefill_s: float  # prefill of one prompt alone
    ttft_s: float  # time to first token under this batch
    tpot_s: float  # time per output token (one decode step through all stages)
    decode_tok_s: float  # output tokens/s during decode, all replicas
    throughput_tok_s: float  # output tokens/s with prefill time amortized, all replicas
    usd_per_mtok: float  # $ per million output tokens (0 when the hardware has no price)
    decode_step: StepCost  # the fullest stage's decode step at the mean context
    prefill_step: StepCost  # the prefill of one prompt


def tpot_s(spec: ModelSpec, hw: HardwareSpec, layout: Layout, batch: int, context: float) -> tuple[float, StepCost]:
    """Time per output token at batch and context, and the stage cost behind it.

    With pp stages the batch runs as pp micro-batches; a token passes every stage in turn,
    so a sequence waits pp stage-steps per token while every stage stays busy.
    """
    micro_batch = math.ceil(batch / layout.pp)
    stage = decode_stage_cost(spec, hw, layout, micro_batch, context)
    hand_off = p2p_s(hw, micro_batch * spec.hidden_size * layout.weight_format.activation_bytes)
    return layout.pp * stage.time_s + (layout.pp - 1) * hand_off, stage


def batch_prefill_s(spec: ModelSpec, hw: HardwareSpec, layout: Layout, num_prompts: int, prompt_len: int) -> float:
    """Seconds to prefill num_prompts prompts, pipelined as pp micro-batches over pp stages."""
    pp = layout.pp
    micro = prefill_cost(spec, hw, layout, math.ceil(num_prompts / pp), prompt_len).time_s
    # Each stage does 1/pp of a micro-batch's work; pp micro-batches fill and drain the pipe.
    return micro if pp == 1 else (2 * pp - 1) * micro / pp


def predict(spec: ModelSpec, hw: HardwareSpec, layout: Layout, workload: Workload, batch: int) -> Prediction:
    """Latency, throughput and price of layout at `batch` sequences per replica."""
    prefill = prefill_cost(spec, hw, layout, 1, workload.prompt_len)
    tpot, stage = tpot_s(spec, hw, layout, batch, workload.mean_decode_context)
    # A new request waits for at most one in-flight decode step of the running batch.
    ttft = prefill.time_s + (tpot if batch > 1 else 0.0)
    cycle_s = batch_prefill_s(spec, hw, layout, batch, workload.prompt_len) + workload.output_len * tpot
    throughput = layout.replicas * batch * workload.output_len / cycle_s
    usd_per_s = hw.usd_per_hour * layout.num_devices / SECONDS_PER_HOUR
    return Prediction(
        batch=batch, prefill_s=prefill.time_s, ttft_s=ttft, tpot_s=tpot,
        decode_tok_s=layout.replicas * batch / tpot, throughput_tok_s=throughput,
        usd_per_mtok=usd_per_s / throughput * TOKENS_PER_PRICE_UNIT, decode_step=stage,
        prefill_step=prefill)


@dataclass(frozen=True)
class RatePrediction:
    """Predicted prefill and decode rates of one device at a batch size (for plan-vs-measured checks)."""

    batch: int
    prefill_tok_s: float  # prompt tokens/s prefilling `batch` prompts together
    decode_tok_s: float  # output tokens/s of `batch` sequences decoding together
    prefill_s: float  # seconds for the whole batched prefill
    tpot_s: float  # seconds per decode step
    prefill_bound: str  # memory | compute | ...
    decode_bound: str
    decode_term: tuple[str, float]  # the decode step's largest term and its share of the step


def runtime_kv_format(hw: HardwareSpec, fmt: WeightFormat) -> str:
    """The KV format an engine keeps by default: a calibrated runtime's activation dtype, else fmt's."""
    return hw.runtime.dtype if hw.runtime is not None else default_kv_format(fmt)


def predict_rates(spec: ModelSpec, hw: HardwareSpec, batch: int, prompt_len: int,
                  weight_format: str | WeightFormat = "fp32", kv_format: str | None = None,
                  decode_context: float | None = None) -> RatePrediction:
    """Prefill and decode tok/s of one device running `batch` sequences (decode at decode_context tokens)."""
    fmt = get_weight_format(weight_format) if isinstance(weight_format, str) else weight_format
    layout = Layout(fmt, kv_format or runtime_kv_format(hw, fmt))
    prefill = prefill_cost(spec, hw, layout, batch, prompt_len)
    step = decode_stage_cost(spec, hw, layout, batch, prompt_len if decode_context is None else decode_context)
    return RatePrediction(
        batch=batch, prefill_tok_s=batch * prompt_len / prefill.time_s, decode_tok_s=batch / step.time_s,
        prefill_s=prefill.time_s, tpot_s=step.time_s, prefill_bound=prefill.bound, decode_bound=step.bound,
        decode_term=step.dominant_term())
