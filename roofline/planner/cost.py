"""Roofline step costs: one decode step and one prefill pass, split into bytes, FLOPs, communication, offload."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from roofline.planner import eager
from roofline.planner.formats import WeightFormat
from roofline.planner.hardware import HardwareSpec
from roofline.planner.layout import Layout
from roofline.planner.memory import (MAX_BATCHED_TOKENS, kv_bytes_per_token_per_device,
                                     stage_layers)
from roofline.planner.model_spec import KV_TENSORS, ModelSpec

ALLREDUCES_PER_LAYER = 2  # after attention's output projection and after the MLP


@dataclass(frozen=True)
class StepCost:
    """Seconds one forward step spends per roofline term on the slowest device.

    Device memory reads and compute overlap (the roofline's max); offload streams overlap with
    both (FlexGen's max over concurrent transfers); communication adds on top.
    """

    weight_read_s: float  # reading weights from device memory
    kv_read_s: float  # reading (and writing) the KV cache in device memory
    compute_s: float  # matmul and attention FLOPs at the device's rate
    comm_s: float = 0.0  # tensor-parallel all-reduces and pipeline hand-offs
    host_link_s: float = 0.0  # offload: weights/KV over PCIe
    disk_s: float = 0.0  # offload: weights read from disk
    host_attention_s: float = 0.0  # offload: CPU attention over KV held in host RAM
    overhead_s: float = 0.0  # fixed per-layer costs: kernel launches, op dispatch
    # Measured eager-runtime terms (a calibrated profile), run between the matmuls so they add:
    attention_s: float = 0.0  # paged attention: cache writes, block gathers, SDPA (KV reads included)
    elementwise_s: float = 0.0  # norms, rotary, SwiGLU, residual adds over the step's activations
    sampling_s: float = 0.0  # sampler, and the engine's scheduling and input preparation
    # KV reads run as their own ops after the matmuls (an eager runtime with a measured matmul curve,
    # whose matmul time already includes reading the weights): they add rather than overlap.
    is_kv_serial: bool = False

    @property
    def memory_s(self) -> float:
        """Device memory time."""
        return self.weight_read_s + self.kv_read_s

    @property
    def serial_s(self) -> float:
        """Terms that run on their own, between the overlapped streams."""
        return self.comm_s + self.overhead_s + self.attention_s + self.elementwise_s + self.sampling_s

    @property
    def time_s(self) -> float:
        """Step time: the slowest overlapped stream plus the serial terms."""
        if self.is_kv_serial:
            return max(self.weight_read_s, self.compute_s, self.host_link_s, self.disk_s,
                       self.host_attention_s) + self.kv_read_s + self.serial_s
        return max(self.memory_s, self.compute_s, self.host_link_s, self.disk_s,
                   self.host_attention_s) + self.serial_s

    @property
    def bound(self) -> str:
        """Which ceiling limits the step: memory, compute, transfer (offload), communication, attention
        (a calibrated runtime's paged attention) or overhead (dispatch, elementwise ops, sampling)."""
        overlapped = {"memory": self.memory_s, "compute": self.compute_s,
                      "transfer": max(self.host_link_s, self.disk_s, self.host_attention_s)}
        eager = self.overhead_s + self.attention_s + self.elementwise_s + self.sampling_s
        if eager > max(overlapped.values()) and eager > self.comm_s:
            return "attention" if self.attention_s > eager - self.attention_s else "overhead"
        if self.comm_s > max(overlapped.values()):
            return "communication"
        return max(overlapped, key=overlapped.__getitem__)

    def dominant_term(self) -> tuple[str, float]:
        """The single largest term and its share of step time, e.g. ('weight reads', 0.74)."""
        terms = {"weight reads": self.weight_read_s, "KV cache reads": self.kv_read_s,
                 "matmul FLOPs": self.compute_s, "tensor-parallel communication": self.comm_s,
                 "weight/KV transfer over the host link": self.host_link_s,
                 "weight reads from disk": self.disk_s, "CPU attention over host KV": self.host_attention_s,
                 "per-layer launch/dispatch overhead": self.overhead_s,
                 "paged attention": self.attention_s, "elementwise ops": self.elementwise_s,
                 "sampling and scheduling": self.sampling_s}
        name = max(terms, key=terms.__getitem__)
        return name, terms[name] / self.time_s if self.time_s > 0 else 0.0


def allreduce_s(hw: HardwareSpec, tp: int, num_bytes: float, num_calls: int = 1) -> float:
    """Ring all-reduces moving num_bytes in all over tp devices: latency per call plus 2(tp-1)/tp of the bytes."""
    if tp == 1:
        return 0.0
    return num_calls * hw.interconnect_latency_s + 2 * (tp - 1) / tp * num_bytes / hw.interconnect_bandwidth


def p2p_s(hw: HardwareSpec, num_bytes: float) -> float:
    """One pipeline hand-off of num_bytes between neighbouring stages."""
    return hw.interconnect_latency_s + num_bytes / hw.interconnect_bandwidth


def _head_params(spec: ModelSpec) -> int:
    return spec.vocab_size * spec.hidden_size + spec.final_norm_params


def _offload_terms(hw: HardwareSpec, layout: Layout, weight_bytes: float,
                   kv_host_bytes: float) -> tuple[float, float]:
    """(host link seconds, disk seconds) to stream the offloaded share of weight_bytes, plus host KV."""
    placement = layout.placement
    streamed = weight_bytes * (placement.weights_on_host + placement.weights_on_disk)
    disk_s = weight_bytes * placement.weights_on_disk / hw.disk_bandwidth
    # A CPU "device" maps disk pages straight into RAM: there is no host link to cross.
    link_s = 0.0 if hw.host_link_bandwidth is None else (streamed + kv_host_bytes) / hw.host_link_bandwidth
    return link_s, disk_s


def decode_stage_cost(spec: ModelSpec, hw: HardwareSpec, layout: Layout, batch: int,
                      context: float) -> StepCost:
    """One decode step of `batch` sequences at `context` tokens on the fullest pipeline stage."""
    tp, fmt, placement = layout.tp, layout.weight_format, layout.placement
    layers = stage_layers(spec, layout.pp)
    # The last stage holds the most: its layers plus the LM head, vocabulary split over tp.
    weight_bytes = (layers * spec.layer_params_per_rank(tp) + _head_params(spec) / tp) * fmt.bytes_per_weight
    kv_bytes = batch * context * kv_bytes_per_token_per_device(spec, layout)
    layer_share = layers / spec.num_layers
    flops = batch * ((spec.matmul_flops_per_token + spec.attention_flops(context)) * layer_share
                     + spec.lm_head_flops) / tp
    kv_host = kv_bytes * (1.0 - placement.kv_on_device)
    link_s, disk_s = _offload_terms(hw, layout, weight_bytes, 0.0)
    comm_s = ALLREDUCES_PER_LAYER * layers * allreduce_s(
        hw, tp, batch * spec.hidden_size * fmt.activation_bytes)
    if hw.runtime is not None:
        rc = hw.runtime
        layer_flops = batch * spec.matmul_flops_per_token * layer_share / tp
        return StepCost(
            weight_read_s=weight_bytes / hw.memory_bandwidth, kv_read_s=0.0,
            compute_s=_eager_matmul_s(spec, hw, fmt, layer_flops, batch * spec.lm_head_flops / tp,
                                      batch, batch),
            comm_s=comm_s, host_link_s=link_s, disk_s=disk_s, overhead_s=layers * rc.layer_dispatch_s,
            host_attention_s=kv_host / hw.host_bandwidth if kv_host > 0 else 0.0,
            attention_s=placement.kv_on_device * eager.decode_attention_s(
                rc, layers, batch, context,
                KV_TENSORS * spec.kv_heads_per_rank(tp) * spec.head_dim * layout.kv_bytes),
            elementwise_s=eager.elementwise_s(rc, layers, batch, _elements_per_token(spec, tp)),
            sampling_s=eager.sampling_s(rc, batch, spec.vocab_size))
    return StepCost(
        weight_read_s=weight_bytes / hw.memory_bandwidth,
        kv_read_s=(kv_bytes - kv_host) / hw.memory_bandwidth,
        compute_s=flops / hw.matmul_rate(fmt.compute_dtype, batch), comm_s=comm_s,
        host_link_s=link_s, disk_s=disk_s, overhead_s=layers * hw.layer_overhead_s,
        host_attention_s=kv_host / hw.host_bandwidth if kv_host > 0 else 0.0,
        is_kv_serial=hw.has_matmul_curve(fmt.compute_dtype))


def prefill_cost(spec: ModelSpec, hw: HardwareSpec, layout: Layout, num_prompts: int,
                 prompt_len: int) -> StepCost:
    """Prefill of num_prompts prompts through the whole model (all stages in turn), per tensor rank."""
    tp, fmt, placement = layout.tp, layout.weight_format, layout.placement
    tokens = num_prompts * prompt_len
    # Chunked prefill reads every weight once per chunk: MAX_BATCHED_TOKENS, or a calibrated runtime's step.
    chunk_tokens = MAX_BATCHED_TOKENS if hw.runtime is None else hw.runtime.chunk_tokens
    num_chunks = math.ceil(tokens / chunk_tokens)
    weight_bytes = (spec.num_layers * spec.layer_params_per_rank(tp) + _head_params(spec) / tp) \
        * fmt.bytes_per_weight
    kv_per_token = KV_TENSORS * spec.num_layers * spec.kv_heads_per_rank(tp) * spec.head_dim * layout.kv_bytes
    kv_written = tokens * kv_per_token
    kv_host = kv_written * (1.0 - placement.kv_on_device)
    link_s, disk_s = _offload_terms(hw, layout, num_chunks * weight_bytes, kv_host)
    activation_bytes = tokens * spec.hidden_size * fmt.activation_bytes
    comm_s = ALLREDUCES_PER_LAYER * spec.num_layers * allreduce_s(hw, tp, activation_bytes, num_chunks)
    if layout.pp > 1:
        comm_s += (layout.pp - 1) * p2p_s(hw, activation_bytes)
    streams = StepCost(
        weight_read_s=num_chunks * weight_bytes / hw.memory_bandwidth,
        kv_read_s=(kv_written - kv_host) / hw.memory_bandwidth,
        # Each chunk's matmuls run chunk_tokens rows at a time (fewer for a short batch).
        compute_s=num_prompts * spec.prefill_flops(prompt_len) / tp
        / hw.matmul_rate(fmt.compute_dtype, min(tokens, chunk_tokens)),
        comm_s=comm_s, host_link_s=link_s, disk_s=disk_s,
        overhead_s=num_chunks * spec.num_layers * hw.prefill_overhead_s())
    return streams if hw.runtime is None else _eager_prefill_terms(spec, hw, layout, num_prompts, prompt_len,
                                                                   streams)


def _elements_per_token(spec: ModelSpec, tp: int) -> float:
    """Activation elements per token per layer on one tensor-parallel rank (heads and MLP split)."""
    return eager.activation_elements(spec.hidden_size, spec.intermediate_size / tp, spec.num_heads / tp,
                                     spec.kv_heads_per_rank(tp), spec.head_dim)


def _eager_matmul_s(spec: ModelSpec, hw: HardwareSpec, fmt: WeightFormat, layer_flops: float, head_flops: float,
                    layer_rows: float, head_rows: float) -> float:
    """Matmul seconds on a calibrated runtime: the measured curve of the kernel that runs `fmt` (it includes
    reading the weights), else FLOPs at the hardware's rate for the format's compute dtype (unmeasured)."""
    rc = hw.runtime
    layer_kernel, head_kernel = rc.kernels(fmt)
    width, dtype = spec.hidden_size, fmt.compute_dtype
    layers = (eager.layers_matmul_s(rc, layer_kernel, width, layer_flops, layer_rows) if layer_kernel
              else layer_flops / hw.matmul_rate(dtype, layer_rows))
    head = (eager.head_matmul_s(rc, head_kernel, width, head_flops, head_rows) if head_kernel
            else head_flops / hw.matmul_rate(dtype, head_rows))
    return layers + head


def _eager_prefill_terms(spec: ModelSpec, hw: HardwareSpec, layout: Layout, num_prompts: int, prompt_len: int,
                         streams: StepCost) -> StepCost:
    """Prefill on a calibrated eager runtime: `streams`' weight reads, offload and communication, with the
    runtime's terms: its scheduler's steps, measured matmul curves, dispatch, elementwise work, causal
    attention per chunk (its KV writes included) and sampling of each prompt's first token."""
    rc, tp, fmt = hw.runtime, layout.tp, layout.weight_format
    tokens = num_prompts * prompt_len
    num_steps, num_chunks = eager.prompt_chunks(num_prompts, prompt_len, rc.chunk_tokens)
    layers = spec.num_layers
    rows = min(tokens, rc.chunk_tokens)
    compute_s = _eager_matmul_s(spec, hw, fmt, tokens * spec.matmul_flops_per_token / tp,
                                num_prompts * spec.lm_head_flops / tp, rows, max(1.0, num_prompts / num_steps))
    causal_pairs = num_prompts * prompt_len * (prompt_len + 1) / 2
    return replace(
        streams, kv_read_s=0.0, compute_s=compute_s, overhead_s=num_steps * layers * rc.layer_dispatch_s,
        attention_s=eager.prefill_attention_s(rc, layers, num_chunks, causal_pairs, spec.num_heads / tp,
                                              spec.head_dim),
        elementwise_s=eager.elementwise_s(rc, layers, tokens, _elements_per_token(spec, tp)),
        # One sampled token per prompt; the engine's bookkeeping once per step and per prompt chunk.
        sampling_s=eager.sampling_s(rc, num_prompts, spec.vocab_size, num_chunks)
        + (num_steps - 1) * rc.schedule_step_s)


def arithmetic_intensity(spec: ModelSpec, layout: Layout, batch: int, context: float) -> float:
    """FLOPs per byte of device memory traffic in one decode step (single device, no offload)."""
    fmt = layout.weight_format
    weight_bytes = spec.decode_read_params() * fmt.bytes_per_weight
    kv_bytes = batch * context * spec.kv_bytes_per_token(layout.kv_bytes)
    return batch * spec.decode_flops_per_token(context) / (weight_bytes + kv_bytes)


def crossover_batch(spec: ModelSpec, hw: HardwareSpec, layout: Layout, context: float = 0.0) -> float | None:
    """Batch at which decode turns compute-bound on one device; None if KV reads keep it memory-bound."""
    fmt = layout.weight_format
    weight_s = spec.decode_read_params() * fmt.bytes_per_weight / hw.memory_bandwidth
    # Per sequence: compute time grows by F/rate, memory time by the KV it reads.
    per_seq_compute_s = spec.decode_flops_per_token(context) / hw.flops_for(fmt.compute_dtype)
    per_seq_kv_s = context * spec.kv_bytes_per_token(layout.kv_bytes) / hw.memory_bandwidth
    margin = per_seq_compute_s - per_seq_kv_s
    return weight_s / margin if margin > 0 else None
