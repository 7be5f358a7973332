"""Low-bit linear layers against a floating-point reference on random data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from roofline.loaders.gguf import GGMLTensor
from roofline.quant.embedding import Int8Embedding, Int8LMHead
from roofline.quant.functional import dequantize_int4, quantize_int4
from roofline.quant.linear import DYNAMIC_INT8_MIN_ROWS, Int4Linear, Int8Linear, int8_linear

# bf16 activations and outputs (the kernels' precision) cost about 2^-8 relative
KERNEL_TOL = 1e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _data(out_features: int, in_features: int, rows: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=g) * 0.05, torch.randn(rows, in_features, generator=g)


def _int8(w: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
    layer = Int8Linear(w.shape[1], [w.shape[0]], bias=bias is not None)
    layer.load("weight", w)
    if bias is not None:
        layer.load("bias", bias)
    layer.finalize()
    return layer


def _int4(w: torch.Tensor, group_size: int, bias: torch.Tensor | None = None) -> Int4Linear:
    layer = Int4Linear(w.shape[1], [w.shape[0]], group_size, bias=bias is not None)
    layer.load("weight", w)
    if bias is not None:
        layer.load("bias", bias)
    layer.finalize()
    return layer


def test_int8_linear_matches_float_reference():
    w, x = _data(96, 160)
    bias = torch.randn(96)
    layer = _int8(w, bias)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (7, 96)
    assert _rel(y, F.linear(x, layer.dequantize(), bias)) < KERNEL_TOL  # the kernel computes what we stored
    assert _rel(y, F.linear(x, w, bias)) < 2e-2  # and int8 stays close to the original


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_linear_matches_float_reference(group_size):
    w, x = _data(64, 256)
    bias = torch.randn(64)
    layer = _int4(w, group_size, bias)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (7, 64)
    assert _rel(y, F.linear(x, layer.dequantize(), bias)) < KERNEL_TOL
    assert _rel(y, F.linear(x, w, bias)) < 0.15  # 4 bits: about 1/30 of a group's range per value


def test_int4_packing_keeps_the_loaded_values():
    w, _ = _data(48, 128)
    layer = Int4Linear(128, [32, 16], 32)
    layer.load("weight", w[:32], 0)
    assert not layer.is_packed
    layer.load("weight", w[32:], 1)
    assert layer.is_packed  # packed as soon as every shard is in
    expected = dequantize_int4(quantize_int4(w, 32))
    # packed scales and zeros are bf16: equal up to bf16 rounding of the per-group parameters
    assert (layer.dequantize() - expected).abs().max() <= 2 ** -7 * expected.abs().max()


def test_packed_shards_load_like_one_matrix():
    w, x = _data(32 + 16 + 16, 64)
    whole = _int8(w)
    packed = Int8Linear(64, [32, 16, 16])
    for shard, rows in enumerate([slice(0, 32), slice(32, 48), slice(48, 64)]):
        packed.load("weight", w[rows], shard)
    packed.finalize()
    assert torch.equal(packed(x), whole(x))
    packed4 = Int4Linear(64, [32, 16, 16], 32)
    for shard, rows in enumerate([slice(0, 32), slice(32, 48), slice(48, 64)]):
        packed4.load("weight", w[rows], shard)
    packed4.finalize()
    assert torch.equal(packed4(x), _int4(w, 32)(x))


def test_shard_shape_mismatch_is_an_error():
    layer = Int4Linear(64, [32, 32], 32)
    with pytest.raises(ValueError, match="shape mismatch"):
        layer.load("weight", torch.zeros(16, 64), 1)


def test_int4_needs_divisible_shapes():
    with pytest.raises(ValueError, match="divisible"):
        Int4Linear(576, [576], 128)
    with pytest.raises(ValueError, match="divisible"):
        Int4Linear(64, [40], 32)


@pytest.mark.parametrize("make", [_int8, lambda w: _int4(w, 32)])
def test_each_row_gets_the_same_result_alone_or_in_a_batch(make):
    # within one kernel path: int8 switches to int8 activations from DYNAMIC_INT8_MIN_ROWS rows up
    w, x = _data(64, 128, rows=40)
    layer = make(w)
    small, large = layer(x[:DYNAMIC_INT8_MIN_ROWS - 1]), layer(x)
    for start, stop in [(0, 1), (2, 3), (1, 5)]:
        assert torch.equal(layer(x[start:stop]), small[start:stop])
    for start, stop in [(3, 20), (17, 40), (10, 10 + DYNAMIC_INT8_MIN_ROWS)]:
        assert torch.equal(layer(x[start:stop]), large[start:stop])


def test_dynamic_int8_activations_match_the_weight_only_kernel():
    w, x = _data(64, 128, rows=40)
    layer = _int8(w)
    ref = F.linear(x, layer.dequantize())
    assert _rel(int8_linear(x, layer.weight, layer.scale, layer.scale_bf16, dynamic_min_rows=1), ref) < KERNEL_TOL
    assert _rel(int8_linear(x, layer.weight, layer.scale, layer.scale_bf16, dynamic_min_rows=100), ref) < KERNEL_TOL


@pytest.mark.parametrize("bias", [False, True])
def test_generic_path_of_other_devices_matches_the_cpu_kernels(bias):
    # what CUDA and other devices run (plain nibble pairs / int8, dequantize, F.linear), exercised on the CPU
    w, x = _data(64, 128, rows=5)
    b = torch.randn(64) if bias else None
    for make in (lambda: Int8Linear(128, [64], bias=bias), lambda: Int4Linear(128, [64], 32, bias=bias)):
        fast, generic = make(), make()
        generic.use_cpu_kernels = False
        for layer in (fast, generic):
            layer.load("weight", w)
            if bias:
                layer.load("bias", b)
            layer.finalize()
        assert _rel(generic(x), fast(x)) < KERNEL_TOL
        assert torch.equal(generic.dequantize(), fast.dequantize()) or isinstance(fast, Int4Linear)
        assert (generic.dequantize() - fast.dequantize()).abs().max() <= 2 ** -7 * w.abs().max()


def test_odd_input_sizes_fall_back_to_a_correct_path():
    w, x = _data(64, 120, rows=9)  # the int8 kernel needs K % 16 == 0
    layer = _int8(w)
    assert _rel(layer(x), F.linear(x, layer.dequantize())) < 1e-5


def test_gguf_blocks_load_into_int4_and_int8_layers():
    from gguf import GGMLQuantizationType, quants

    w, x = _data(64, 96)
    for type_name, layer in [("Q4_1", Int4Linear(96, [64], 32)), ("Q4_0", Int4Linear(96, [64], 32)),
                             ("Q8_0", Int8Linear(96, [64])), ("Q4_1", Int8Linear(96, [64])),
                             ("Q8_0", Int4Linear(96, [64], 32))]:
        raw = quants.quantize(w.numpy(), GGMLQuantizationType[type_name])
        ref = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[type_name]))
        layer.load("weight", GGMLTensor(type_name, (64, 96), torch.from_numpy(raw)))
        layer.finalize()
        if isinstance(layer, Int4Linear) and type_name.startswith("Q4"):  # exact up to bf16 scales/zeros
            assert (layer.dequantize() - ref).abs().max() <= 2 ** -7 * ref.abs().max()
        assert _rel(layer(x), F.linear(x, ref)) < (KERNEL_TOL if type_name != "Q8_0" or
                                                   isinstance(layer, Int8Linear) else 0.15), type_name


def test_int8_embedding_and_tied_head():
    w, x = _data(100, 64)
    emb = Int8Embedding(100, 64, torch.float32)
    emb.load_tensor(w)
    ids = torch.tensor([0, 5, 99, 5])
    assert (emb(ids) - w[ids]).abs().max() <= emb.scale[ids, None].max() / 2 + 1e-7
    head = Int8LMHead(100, 64, tied_to=emb)
    assert head.is_tied and head.is_loaded
    logits = head(x)
    assert logits.dtype == torch.float32 and logits.shape == (7, 100)
    assert _rel(logits, x @ w.t()) < 2e-2
    assert logits[0].unique().numel() == 100  # fp32-precise logits: no bf16 ties
