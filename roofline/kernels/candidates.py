"""Candidate matmul kernels per low-bit weight format, each with the accuracy it promises.

A candidate turns one layer's weights (`LowBitWeights`) into a function x [T, K] -> y [T, N]. Which
one runs is decided by measurement on the machine (`selector.py`), never by instruction set: the same
kernel is 2x faster on one CPU and 100x slower on another (`torch._int_mm` on a Zen 2 runs a scalar
path). A candidate whose library is missing raises `KernelUnavailable` from `prepare`.

Accuracy classes, from strictest:
- EXACT: fp32-precise activations and fp32 output (the weight's own values, activations good to
  ~2^-13 of the row's largest value or better).
- BF16: activations rounded to bf16, bf16 output (~2^-9 relative).
- INT8: activations rounded to one int8 digit (per token or per tensor); changes a small model's
  perplexity by ~1-3% (docs/quantization.md).
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Kernel = Callable[[torch.Tensor], torch.Tensor]  # x [T, K] -> y [T, N]

INT8_PACK_COL_MULTIPLE = 16  # _weight_int8pack_mm crashes (torch 2.13, CPU) on batches when K % 16 != 0
INT_MM_MIN_BATCH_ROWS = 8  # _int_mm is ~4x slower for 2-7 rows than for 1: fewer go one row at a time
# fbgemm quantizes activations per tensor to 7 bits (reduce_range); digits in [-64, 63] plus one pin row
# holding both ends make its scale exactly 1 and its zero point 64, so integer digits pass through exactly
FBGEMM_DIGIT_MIN, FBGEMM_DIGIT_MAX = -64, 63
FBGEMM_HIGH_STEPS = 63  # the high digit's range: x / step in [-63, 63]
FBGEMM_LOW_STEPS = 126  # the residual in [-0.5, 0.5] steps, scaled into [-63, 63]


class Accuracy(enum.IntEnum):
    """How far a kernel may move a result from the fp32 product with the layer's weights (lower is stricter)."""

    EXACT = 0
    BF16 = 1
    INT8 = 2

    @classmethod
    def parse(cls, text: str) -> "Accuracy":
        """"exact" | "bf16" | "int8" -> Accuracy."""
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"kernel accuracy must be exact, bf16 or int8, got {text!r}") from None


class KernelUnavailable(RuntimeError):
    """This torch build or this weight shape lacks what the candidate needs."""


@dataclass
class LowBitWeights:
    """One layer's weights as the candidates consume them."""

    weight_format: str  # "int8" (per output channel) or "int4" (group-wise, packed for the CPU kernel)
    out_features: int
    in_features: int
    q: torch.Tensor  # int8: [N, K] int8; int4: the packed weight of _weight_int4pack_mm_for_cpu
    scale: torch.Tensor | None = None  # int8: [N] fp32
    scale_bf16: torch.Tensor | None = None  # int8: [N] bf16
    group_size: int | None = None  # int4
    scales_and_zeros: torch.Tensor | None = None  # int4: [G, N, 2] bf16


@dataclass(frozen=True)
class KernelCandidate:
    """A named way to multiply by one weight format, with its accuracy class."""

    name: str
    weight_format: str
    accuracy: Accuracy
    prepare: Callable[[LowBitWeights], Kernel]  # may raise KernelUnavailable
    description: str


def _int8pack_bf16(w: LowBitWeights) -> Kernel:
    if w.in_features % INT8_PACK_COL_MULTIPLE:
        raise KernelUnavailable(f"_weight_int8pack_mm needs K % {INT8_PACK_COL_MULTIPLE} == 0")
    q, s = w.q, w.scale_bf16
    return lambda x: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, s)


def two_digit_split(x: torch.Tensor, high_steps: int, low_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (digits [2T, K] float holding integers, step [T, 1]): x ~ step * (d1 + d2 / low_steps).

    One int8 digit per activation (a scale per token) costs SmolLM2 +2.5% perplexity (outlier
    channels); the second digit carries the rounding residual, for a second GEMM over the same weights.
    """
    step = torch.linalg.vector_norm(x, ord=float("inf"), dim=1, keepdim=True).float().clamp_min_(1e-30) / high_steps
    scaled = x.float() / step
    high = torch.round(scaled)
    low = torch.round((scaled - high) * low_steps)
    return torch.cat([high, low]), step


def int8_activation_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ (scale[:, None] * q)^T with `torch._int_mm` on two int8 digits, fp32 out (~2^-15 precise)."""
    T = x.shape[0]
    digits, step = two_digit_split(x, 127, 127)
    digits = digits.to(torch.int8)  # [2T, K]
    if 2 * T < INT_MM_MIN_BATCH_ROWS:
        acc = torch.cat([torch._int_mm(digits[i:i + 1], q.t()) for i in range(2 * T)]).float()
    else:
        acc = torch._int_mm(digits, q.t()).float()  # [2T, N], exact integers
    return (acc[:T] + acc[T:] / 127) * step * scale


def _int_mm_two_digit(w: LowBitWeights) -> Kernel:
    q, s = w.q, w.scale
    return lambda x: int8_activation_mm(x, q, s)


def _fbgemm_packed(w: LowBitWeights):
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise KernelUnavailable("this torch build has no fbgemm")
    torch.backends.quantized.engine = "fbgemm"
    N = w.out_features
    with warnings.catch_warnings():  # quantized tensors are deprecated in name; fbgemm's packed linear is the op
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(w.q, w.scale.double(), torch.zeros(N, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qw, None)


def _fbgemm_two_digit(w: LowBitWeights) -> Kernel:
    packed = _fbgemm_packed(w)
    pin = torch.zeros(1, w.in_features)
    pin[0, 0], pin[0, -1] = FBGEMM_DIGIT_MIN, FBGEMM_DIGIT_MAX

    def run(x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        digits, step = two_digit_split(x, FBGEMM_HIGH_STEPS, FBGEMM_LOW_STEPS)
        acc = torch.ops.quantized.linear_dynamic(torch.cat([digits, pin]), packed, True)  # [2T + 1, N]
        return (acc[:T] + acc[T:2 * T] / FBGEMM_LOW_STEPS) * step

    return run


def _fbgemm_dynamic(w: LowBitWeights) -> Kernel:
    packed = _fbgemm_packed(w)
    return lambda x: torch.ops.quantized.linear_dynamic(x.float(), packed, True)


def _dequantize_int8(w: LowBitWeights) -> Kernel:
    q, s = w.q, w.scale
    return lambda x: F.linear(x.float(), q.float()) * s


def _int4pack_bf16(w: LowBitWeights) -> Kernel:
    packed, g, sz = w.q, w.group_size, w.scales_and_zeros
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, g, sz)


CANDIDATES: tuple[KernelCandidate, ...] = (
    KernelCandidate("int8pack-bf16", "int8", Accuracy.BF16, _int8pack_bf16,
                    "torch _weight_int8pack_mm, bf16 activations (weight-only GEMV)"),
    KernelCandidate("fbgemm-2digit", "int8", Accuracy.EXACT, _fbgemm_two_digit,
                    "fbgemm int8 GEMM on two 7-bit activation digits (fp32-precise)"),
    KernelCandidate("intmm-2digit", "int8", Accuracy.EXACT, _int_mm_two_digit,
                    "torch._int_mm on two int8 activation digits (fp32-precise)"),
    KernelCandidate("fbgemm-dynamic", "int8", Accuracy.INT8, _fbgemm_dynamic,
                    "fbgemm dynamic int8, one 7-bit digit per tensor"),
    KernelCandidate("dequant-fp32", "int8", Accuracy.EXACT, _dequantize_int8,
                    "dequantize to fp32 per call, then F.linear (reference)"),
    KernelCandidate("int4pack-bf16", "int4", Accuracy.BF16, _int4pack_bf16,
                    "torch _weight_int4pack_mm_for_cpu, bf16 activations"),
)


def candidates_for(weight_format: str, pool: tuple[KernelCandidate, ...] = CANDIDATES) -> list[KernelCandidate]:
    """The candidates that consume `weight_format`, in registry order."""
    return [c for c in pool if c.weight_format == weight_format]


def candidate_names(pool: tuple[KernelCandidate, ...] = CANDIDATES) -> list[str]:
    """Every candidate's name."""
    return [c.name for c in pool]
