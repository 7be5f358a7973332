"""Memory a layout needs per device (weights, KV cache, activations, reserve) and the largest batch that fits."""

from __future__ import annotations

import math
from dataclasses import dataclass

from roofline.planner.hardware import HardwareSpec
from roofline.planner.layout import Layout
from roofline.planner.model_spec import KV_TENSORS, ModelSpec

MAX_BATCHED_TOKENS = 8192  # chunked prefill: most tokens in one forward pass
LOGIT_BYTES = 4  # logits are kept in fp32 for sampling
STREAM_BUFFER_LAYERS = 2  # offloaded weights: the layer computing and the one being prefetched
BATCH_SEARCH_LIMIT = 1 << 20  # upper bound for the largest-batch search


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes one device (the fullest pipeline stage) needs, and the host RAM offloading uses."""

    weights: float  # resident weights (plus streaming buffers when offloaded)
    kv_cache: float  # KV cache of the batch at full context on the device
    activations: float  # peak activations of one forward pass plus logits
    reserved: float  # runtime reserve (context, workspaces, allocator slack)
    capacity: float  # device memory
    host: float = 0.0  # host RAM holding offloaded weights and KV
    host_capacity: float = 0.0  # host RAM available for offload

    @property
    def total(self) -> float:
        """Device bytes needed."""
        return self.weights + self.kv_cache + self.activations + self.reserved

    @property
    def fits(self) -> bool:
        """Whether the device and host tiers both hold what they must."""
        return self.total <= self.capacity and self.host <= self.host_capacity


def stage_layers(spec: ModelSpec, pp: int) -> int:
    """Layers in the largest pipeline stage."""
    return math.ceil(spec.num_layers / pp)


def stage_extra_params(spec: ModelSpec, pp: int) -> float:
    """Non-layer parameters on the fullest stage: embedding and head (first/last stage when pp > 1)."""
    head = spec.vocab_size * spec.hidden_size
    if pp == 1:
        return spec.embedding_params + spec.lm_head_params + spec.final_norm_params
    # The first stage holds the embedding, the last the head (a copy of the table when tied).
    return max(spec.embedding_params, head + spec.final_norm_params)


def weight_bytes_per_device(spec: ModelSpec, layout: Layout) -> float:
    """Weight bytes on the fullest device of one replica, before any offloading."""
    tp, pp = layout.tp, layout.pp
    # Embedding and head are split over tensor-parallel ranks by vocabulary.
    params = stage_layers(spec, pp) * spec.layer_params_per_rank(tp) + stage_extra_params(spec, pp) / tp
    return params * layout.weight_format.bytes_per_weight


def layer_bytes_per_device(spec: ModelSpec, layout: Layout) -> float:
    """Weight bytes of one layer on one tensor-parallel rank."""
    return spec.layer_params_per_rank(layout.tp) * layout.weight_format.bytes_per_weight


def kv_bytes_per_token_per_device(spec: ModelSpec, layout: Layout) -> float:
    """KV bytes one token occupies on the fullest device."""
    heads = spec.kv_heads_per_rank(layout.tp)
    return KV_TENSORS * stage_layers(spec, layout.pp) * heads * spec.head_dim * layout.kv_bytes


def activation_bytes(spec: ModelSpec, layout: Layout, batch: int, context: int) -> float:
    """Peak activation bytes of one forward pass (a prefill chunk or a decode batch) plus logits."""
    tp, h = layout.tp, spec.hidden_size
    tokens = min(MAX_BATCHED_TOKENS, batch * context)
    qkv = spec.head_dim * (spec.num_heads + 2 * spec.num_kv_heads) / tp
    mlp = spec.intermediate_size * (2 if spec.is_gated_mlp else 1) / tp
    # Residual stream, normed input, attention output, qkv and MLP hidden live at once.
    per_token = (3 * h + qkv + mlp) * layout.weight_format.activation_bytes
    logits = batch * spec.vocab_size / tp * LOGIT_BYTES
    return tokens * per_token + logits


def memory_needed(spec: ModelSpec, hw: HardwareSpec, layout: Layout, batch: int,
                  context: int) -> MemoryBreakdown:
    """Device and host bytes for batch sequences of context tokens each."""
    placement = layout.placement
    weights = weight_bytes_per_device(spec, layout)
    kv = batch * context * kv_bytes_per_token_per_device(spec, layout)
    device_weights = weights * placement.weights_on_device
    if placement.weights_on_device < 1.0:
        device_weights += STREAM_BUFFER_LAYERS * layer_bytes_per_device(spec, layout)
    host = weights * placement.weights_on_host + kv * (1.0 - placement.kv_on_device)
    return MemoryBreakdown(
        weights=device_weights, kv_cache=kv * placement.kv_on_device,
        activations=activation_bytes(spec, layout, batch, context), reserved=hw.reserved_bytes,
        capacity=hw.memory_bytes, host=host, host_capacity=hw.host_memory_bytes)


def max_batch(spec: ModelSpec, hw: HardwareSpec, layout: Layout, context: int,
              limit: int = BATCH_SEARCH_LIMIT) -> int:
    """Largest batch (<= limit) whose memory fits; 0 when not even one sequence fits."""
    if not memory_needed(spec, hw, layout, 1, context).fits:
        return 0
    low, high = 1, limit  # invariant: low fits; memory grows with batch, so bisect
    if memory_needed(spec, hw, layout, high, context).fits:
        return high
    while high - low > 1:
        middle = (low + high) // 2
        if memory_needed(spec, hw, layout, middle, context).fits:
            low = middle
        else:
            high = middle
    return low
