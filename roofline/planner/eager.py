"""This runtime's own costs (RuntimeCosts, measured by `roofline calibrate`) and the step terms they give.

A datasheet roofline charges a decode step its weight bytes over bandwidth or its FLOPs over the
peak rate. roofline's eager PyTorch forward also pays for what a fused engine hides: matmuls on
small, oddly shaped weights run below the large-matmul peak; every op is dispatched on its own;
norms, rotary, SiLU and residual adds stream activations through memory; paged attention gathers
the KV blocks and expands them to the query heads. Calibrate measures each with the runtime's own
modules, and these pure functions scale them to a model's shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from roofline.planner.formats import WeightFormat

FLOAT_ALIASES = {"bf16": "fp16", "fp16": "bf16"}  # half-precision dtypes that stand in for each other
# Achieved FLOP/s against rows per step: ((rows, FLOP/s), ...) ascending in rows.
Curve = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class RuntimeCosts:
    """Measured costs of roofline's eager forward on one machine, in seconds or per-second rates."""

    dtype: str  # the activation dtype, which the "float" kernel computes in (fp32 on a CPU, bf16 on a GPU)
    # By kernel ("float", "int8", "int4"): (hidden width, curve) pairs of decoder-layer-shaped weights
    # (q/k/v, o, gate/up, down), ascending in width
    layer_curves: dict[str, tuple[tuple[int, Curve], ...]]
    # By kernel ("float", "int8"): (hidden width, curve) pairs of an LM-head-shaped [vocab, width] weight
    head_curves: dict[str, tuple[tuple[int, Curve], ...]]
    layer_dispatch_s: float  # fixed seconds of one decoder layer's ops, arithmetic aside
    element_s: float  # seconds per activation element of one layer's norms, rotary, SwiGLU, residuals
    decode_attention_s: float  # fixed seconds of one layer's paged decode attention (cache write, gather, SDPA)
    decode_kv_bandwidth: float  # bytes/s of cached K and V that paged decode attention gets through
    prefill_attention_s: float  # fixed seconds of one layer's attention over one prompt chunk
    prefill_attention_unit_s: float  # seconds per (causal query-key pair x query head x head dim)
    sample_row_s: float  # sampler and engine bookkeeping per sequence per step, vocabulary aside
    sample_logit_s: float  # sampler seconds per logit of one row (raw log-softmax, greedy pick)
    schedule_step_s: float  # the engine's bookkeeping per step: scheduling, input tensors, counters
    schedule_sequence_s: float  # the same per sequence in the step
    chunk_tokens: int  # tokens the engine's scheduler puts in one step by default (max_num_batched_tokens)

    @staticmethod
    def from_mapping(raw: dict) -> "RuntimeCosts":
        """From its JSON form (curves as nested lists)."""
        def curves(items) -> tuple[tuple[int, Curve], ...]:
            return tuple((int(width), tuple((float(r), float(f)) for r, f in points)) for width, points in items)

        values = dict(raw)
        values["layer_curves"] = {kind: curves(items) for kind, items in raw["layer_curves"].items()}
        values["head_curves"] = {kind: curves(items) for kind, items in raw["head_curves"].items()}
        return RuntimeCosts(**values)

    def kernels(self, fmt: WeightFormat) -> tuple[str | None, str | None]:
        """(layer kernel, head kernel) whose measured curves price `fmt`'s matmuls; None where unmeasured.

        Float formats are measured only in the activation dtype; quantized ones run int8 heads.
        """
        kernel = fmt.runtime_kernel
        if kernel == "float" and fmt.compute_dtype not in (self.dtype, FLOAT_ALIASES.get(self.dtype)):
            kernel = None
        head = None if kernel is None else "float" if kernel == "float" else "int8"
        return (kernel if kernel in self.layer_curves else None, head if head in self.head_curves else None)


def interpolate_curve(curve: Curve, rows: float) -> float:
    """A curve's FLOP/s at `rows`, interpolated in log rows and clamped at its ends."""
    points = sorted(curve)
    if rows <= points[0][0]:
        return points[0][1]
    for (r0, f0), (r1, f1) in zip(points, points[1:]):
        if rows <= r1:
            t = (math.log(rows) - math.log(r0)) / (math.log(r1) - math.log(r0))
            return f0 + t * (f1 - f0)
    return points[-1][1]


def curve_rate(curves: tuple[tuple[int, Curve], ...], width: int, rows: float) -> float:
    """FLOP/s at `rows` for weights of `width`: the curves of the nearest measured widths, interpolated
    in log width (clamped outside the measured range)."""
    ordered = sorted(curves)
    if width <= ordered[0][0]:
        return interpolate_curve(ordered[0][1], rows)
    for (w0, c0), (w1, c1) in zip(ordered, ordered[1:]):
        if width <= w1:
            t = (math.log(width) - math.log(w0)) / (math.log(w1) - math.log(w0))
            return (1 - t) * interpolate_curve(c0, rows) + t * interpolate_curve(c1, rows)
    return interpolate_curve(ordered[-1][1], rows)


def activation_elements(hidden: int, intermediate: int, num_heads: int, num_kv_heads: int, head_dim: int) -> float:
    """Activation elements one token's pass through one eager decoder layer reads and writes, outside matmuls.

    Two norms (read, write: 2h each), two residual adds (3h each), rotary on q and k (read, rotate,
    write: 3 per element) and SwiGLU (SiLU reads and writes i, the product reads 2i and writes i).
    """
    return 10 * hidden + 3 * (num_heads + num_kv_heads) * head_dim + 5 * intermediate


def layers_matmul_s(rc: RuntimeCosts, kernel: str, width: int, flops: float, rows: float) -> float:
    """Seconds of decoder-layer matmuls totalling `flops` at `rows` tokens per step, in `kernel`."""
    return flops / curve_rate(rc.layer_curves[kernel], width, rows)


def head_matmul_s(rc: RuntimeCosts, kernel: str, width: int, flops: float, rows: float) -> float:
    """Seconds of the LM head's matmul totalling `flops` at `rows` rows, in `kernel`."""
    return flops / curve_rate(rc.head_curves[kernel], width, rows)


def elementwise_s(rc: RuntimeCosts, num_layers: float, tokens: float, elements_per_token: float) -> float:
    """Seconds of `tokens` tokens' norms, rotary, SwiGLU and residual adds through num_layers layers."""
    return num_layers * tokens * elements_per_token * rc.element_s


def prompt_chunks(num_prompts: int, prompt_len: int, chunk_tokens: int) -> tuple[int, int]:
    """(engine steps, prompt chunks) to prefill num_prompts prompts packed `chunk_tokens` to a step.

    A prompt longer than a step is split over several; shorter prompts share steps, and one prompt per
    step boundary is split in two.
    """
    steps = math.ceil(num_prompts * prompt_len / chunk_tokens)
    if prompt_len >= chunk_tokens:
        return steps, num_prompts * math.ceil(prompt_len / chunk_tokens)
    return steps, num_prompts + steps - 1


def decode_attention_s(rc: RuntimeCosts, num_layers: float, batch: float, context: float,
                       kv_bytes_per_token_layer: float) -> float:
    """Seconds of paged decode attention: `batch` sequences attending `context` tokens in each layer.

    Its time follows the KV bytes (block gather, GQA expansion, SDPA reads) more than the query heads:
    measured at 2, 4 and 8 KV heads under 8 query heads, bytes/s varied far less than time per head.
    """
    return num_layers * (rc.decode_attention_s + batch * context * kv_bytes_per_token_layer / rc.decode_kv_bandwidth)


def prefill_attention_s(rc: RuntimeCosts, num_layers: float, num_chunks: int, causal_pairs: float,
                        num_heads: float, head_dim: int) -> float:
    """Seconds of causal attention over `num_chunks` prompt chunks holding `causal_pairs` query-key pairs."""
    return num_layers * (num_chunks * rc.prefill_attention_s
                         + causal_pairs * num_heads * head_dim * rc.prefill_attention_unit_s)


def sampling_s(rc: RuntimeCosts, rows: float, vocab_size: int, num_sequences: float | None = None) -> float:
    """Seconds to sample `rows` rows over the vocabulary, plus the engine's bookkeeping of one step
    over `num_sequences` sequences (default: one per row)."""
    sequences = rows if num_sequences is None else num_sequences
    return (rows * (rc.sample_row_s + vocab_size * rc.sample_logit_s)
            + rc.schedule_step_s + sequences * rc.schedule_sequence_s)
