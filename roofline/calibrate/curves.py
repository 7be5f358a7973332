"""Matmul curves of `roofline calibrate`: the runtime's own linear layers and LM heads (float, int8,
int4) on Llama-shaped weights, achieved FLOP/s against rows per step, by kernel and width."""

from __future__ import annotations

import math

import torch
from torch import nn

from roofline.planner.eager import Curve
from roofline.planner.timing import best_time

CURVE_ROWS = (1, 4, 16, 64, 256, 512)  # tokens per step the matmul curves are measured at
CURVE_WIDTHS = (512, 2048)  # hidden sizes of the layer- and head-shaped weights
QUICK_CURVE_WIDTHS = (512,)  # --quick: one width (other widths clamp to it)
HEAD_ROWS = 32768  # vocabulary rows of the head-shaped weight at the smallest width (fewer when wider)
MLP_RATIO = 8 / 3  # Llama's intermediate / hidden
KV_RATIO = 4  # query heads per KV head of the probe layers


def intermediate_size(width: int) -> int:
    """The MLP width of a Llama-shaped layer of hidden `width` (8/3 x, rounded to 64)."""
    return 64 * round(MLP_RATIO * width / 64)


def layer_shapes(width: int) -> list[tuple[int, int]]:
    """(in, out) of one Llama layer's packed matmuls at hidden `width`: qkv, o, gate_up, down."""
    inter = intermediate_size(width)
    return [(width, width + 2 * width // KV_RATIO), (width, width), (width, 2 * inter), (inter, width)]


def _float_linear(k: int, n: int, dtype: torch.dtype, device: str) -> nn.Module:
    from roofline.layers.linear import Linear

    layer = Linear(k, [n]).to(device=device, dtype=dtype)
    layer.weight.data.fill_(0.01)
    return layer


def _int8_linear(k: int, n: int, dtype: torch.dtype, device: str) -> nn.Module:
    from roofline.quant.linear import Int8Linear

    layer = Int8Linear(k, [n], device=torch.device(device))
    layer.weight.data.random_(-100, 100)
    layer.scale.fill_(0.01)
    layer.finalize()
    return layer


def _int4_linear(k: int, n: int, dtype: torch.dtype, device: str) -> nn.Module:
    from roofline.quant.linear import Int4Linear

    layer = Int4Linear(k, [n], INT4_GROUP_SIZE, device=torch.device(device))
    layer.weight.data.random_(0, 16)
    layer.scale.fill_(0.01)
    layer.offset.fill_(-0.08)
    layer.finalize()
    return layer


def _float_head(vocab: int, width: int, dtype: torch.dtype, device: str) -> nn.Module:
    from roofline.layers.embedding import LMHead

    head = LMHead(vocab, width).to(device=device, dtype=dtype)
    head.weight.data.fill_(0.01)
    return head


def _int8_head(vocab: int, width: int, dtype: torch.dtype, device: str) -> nn.Module:
    from roofline.quant.embedding import Int8LMHead

    head = Int8LMHead(vocab, width, device=torch.device(device))
    head.weights.qweight.random_(-100, 100)
    head.weights.scale.fill_(0.01)
    head.weights.scale_bf16.fill_(0.01)
    return head


# The runtime's matmul kernels: float (the activation dtype), int8 and int4 linears, and their heads
# (a quantized model's head is int8), with the bytes each stores per weight.
LAYER_KERNELS = {"float": (_float_linear, None), "int8": (_int8_linear, 1.0), "int4": (_int4_linear, 0.5)}
HEAD_KERNELS = {"float": _float_head, "int8": _int8_head}
CURVE_PASSES = 2  # passes over every curve point, best kept
COMPUTE_BOUND_ROWS = 64  # from here on the curve's matmuls reuse each weight enough to be compute-bound
INT4_GROUP_SIZE = 32  # the group the runtime's int4 layers use by default (and GGUF Q4 blocks hold)


def _rate(modules: list[nn.Module], inputs: dict[int, torch.Tensor], rows: int, sync, repeats: int,
          budget_s: float) -> float:
    """FLOP/s of running every module (a linear, or a head over `in_features` inputs) on `rows` rows."""
    seconds = best_time(lambda: [m(inputs[_in_features(m)]) for m in modules], sync, repeats, budget_s)
    return 2.0 * rows * sum(_in_features(m) * _out_features(m) for m in modules) / seconds


def _in_features(module: nn.Module) -> int:
    return module.in_features if hasattr(module, "in_features") else _head_table(module).shape[1]


def _out_features(module: nn.Module) -> int:
    return module.out_features if hasattr(module, "out_features") else _head_table(module).shape[0]


def _head_table(head: nn.Module) -> torch.Tensor:
    """The [vocab, width] table of a float or int8 LM head."""
    return head.weight if hasattr(head, "weight") else head.weights.qweight


def _share(modules: list[nn.Module], rows: int, per_layer: int) -> list[nn.Module]:
    """The weights timed at `rows`: all of them up to COMPUTE_BOUND_ROWS rows, fewer (whole layers) past
    it, where each weight is reused `rows` times and cache residency no longer matters: it saves time."""
    num_layers = len(modules) // per_layer
    keep = max(1, math.ceil(num_layers * min(1.0, COMPUTE_BOUND_ROWS / rows)))
    return modules[: keep * per_layer]


def measure_curves(device: str, dtype: torch.dtype, total_bytes: int, sync, repeats: int, budget_s: float,
                   widths: tuple[int, ...] = CURVE_WIDTHS) -> tuple[dict[str, tuple[tuple[int, Curve], ...]],
                                                                    dict[str, tuple[tuple[int, Curve], ...]]]:
    """(layer curves, head curves) by kernel: achieved FLOP/s against rows at each of `widths`.

    Weights total about `total_bytes` per kernel and width (half that for the quantized kernels, whose
    weights are built from random codes): past the last-level cache, as a model's are. Every point is
    timed in CURVE_PASSES passes over all kernels and widths, keeping the best: a slow spell of a
    shared machine lasts seconds, and one pass's repeats of a point all fall within a second or two.
    """
    float_bytes = torch.finfo(dtype).bits // 8
    inputs = {width: {rows: {k: torch.full((rows, k), 0.5, dtype=dtype, device=device)
                             for k in {width, intermediate_size(width)}} for rows in CURVE_ROWS} for width in widths}
    # (curve kind, kernel, width) -> (modules, modules per layer): what each curve times
    sets: dict[tuple[str, str, int], tuple[list[nn.Module], int]] = {}
    for width in widths:
        params_per_layer = sum(k * n for k, n in layer_shapes(width))
        for kind, (build, weight_bytes) in LAYER_KERNELS.items():
            budget = total_bytes if weight_bytes is None else total_bytes / 2
            num_layers = max(1, int(budget // (params_per_layer * (weight_bytes or float_bytes))))
            sets[("layer", kind, width)] = ([build(k, n, dtype, device) for _ in range(num_layers)
                                             for k, n in layer_shapes(width)], len(layer_shapes(width)))
        for kind, build in HEAD_KERNELS.items():
            # Tables of up to HEAD_ROWS rows, as many as fill the budget: one would sit in the last-level cache.
            element = float_bytes if kind == "float" else 1
            vocab = max(1024, min(HEAD_ROWS, int(total_bytes // (width * element))))
            sets[("head", kind, width)] = ([build(vocab, width, dtype, device)
                                            for _ in range(max(1, int(total_bytes // (vocab * width * element))))], 1)
    best: dict[tuple[str, str, int, int], float] = {}
    for _ in range(CURVE_PASSES):
        for (curve, kind, width), (modules, per_layer) in sets.items():
            for rows in CURVE_ROWS:
                timed = _share(modules, rows, per_layer)
                key = (curve, kind, width, rows)
                best[key] = max(best.get(key, 0.0),
                                _rate(timed, inputs[width][rows], rows, sync, repeats, budget_s))
    result: dict[str, dict[str, tuple[tuple[int, Curve], ...]]] = {"layer": {}, "head": {}}
    for curve, kind, width in sets:
        points = tuple((float(rows), best[(curve, kind, width, rows)]) for rows in CURVE_ROWS)
        result[curve][kind] = result[curve].get(kind, ()) + ((width, points),)
    return result["layer"], result["head"]
