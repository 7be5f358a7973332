"""Quantize/dequantize round trips stay within half a quantization step; GGML blocks decode exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from roofline.quant.functional import (Int4Weight, Int8Weight, decode_ggml, dequantize_int4, dequantize_int8,
                                       quantize_int4, quantize_int8, requantize_int8)

EPS = 1e-6


def _weights(rows: int = 48, cols: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[3] = 0.0  # an all-zero row
    w[5, :64] = 0.7  # constant groups and an outlier-heavy row
    return w


def test_int8_round_trip_within_half_a_step():
    w = _weights()
    q = quantize_int8(w)
    assert q.q.dtype == torch.int8 and q.scale.shape == (w.shape[0],)
    err = (dequantize_int8(q) - w).abs()
    assert (err <= q.scale[:, None] / 2 + EPS).all()
    assert torch.equal(dequantize_int8(q)[3], torch.zeros(w.shape[1]))
    assert q.q.abs().max() <= 127


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_trip_within_half_a_step(group_size):
    w = _weights()
    q = quantize_int4(w, group_size)
    assert q.q.max() <= 15 and q.scale.shape == (w.shape[0], w.shape[1] // group_size)
    step = q.scale.repeat_interleave(group_size, dim=1)
    err = (dequantize_int4(q) - w).abs()
    assert (err <= step / 2 + EPS).all()
    # a group's min and max are represented exactly, and constant groups are exact
    assert torch.allclose(dequantize_int4(q).amax(1), w.amax(1), atol=EPS)
    assert torch.equal(dequantize_int4(q)[5, :32], w[5, :32])


def test_int4_rejects_a_group_size_that_does_not_divide_the_row():
    with pytest.raises(ValueError, match="multiple"):
        quantize_int4(torch.zeros(16, 576), 128)


def test_requantize_grouped_int8_to_per_row():
    g = torch.Generator().manual_seed(1)
    grouped = Int8Weight(torch.randint(-127, 128, (40, 96), generator=g, dtype=torch.int8),
                         torch.rand(40, 3, generator=g) * 0.01, 32)
    per_row = requantize_int8(grouped, rows_per_chunk=16)
    assert per_row.group_size is None and per_row.scale.shape == (40,)
    err = (dequantize_int8(per_row) - dequantize_int8(grouped)).abs()
    assert (err <= per_row.scale[:, None] / 2 + EPS).all()


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_ggml_blocks_decode_to_exactly_ggufs_dequantization(type_name):
    from gguf import GGMLQuantizationType, quants

    w = _weights(rows=32, cols=192).numpy()
    raw = quants.quantize(w, GGMLQuantizationType[type_name])  # [rows, bytes per row]
    ref = quants.dequantize(raw, GGMLQuantizationType[type_name])
    decoded = decode_ggml(type_name, torch.from_numpy(raw), 192)
    expected_cls = Int8Weight if type_name == "Q8_0" else Int4Weight
    assert isinstance(decoded, expected_cls) and decoded.group_size == 32
    ours = dequantize_int8(decoded) if type_name == "Q8_0" else dequantize_int4(decoded)
    np.testing.assert_array_equal(ours.numpy(), ref)


def test_q4_k_blocks_decode_to_exactly_ggufs_dequantization():
    # gguf-py cannot quantize Q4_K, so build valid super-blocks from random bytes and fixed fp16 d / dmin
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (16, 2 * 144), dtype=np.uint8)
    blocks = raw.reshape(16, 2, 144)
    blocks[..., 0:2] = np.frombuffer(np.float16(0.003).tobytes(), np.uint8)
    blocks[..., 2:4] = np.frombuffer(np.float16(0.011).tobytes(), np.uint8)
    ref = quants.dequantize(raw, GGMLQuantizationType.Q4_K)
    decoded = decode_ggml("Q4_K", torch.from_numpy(raw), 512)
    np.testing.assert_array_equal(dequantize_int4(decoded).numpy(), ref)


def test_decode_rejects_mismatched_row_bytes():
    with pytest.raises(ValueError, match="bytes per row"):
        decode_ggml("Q4_1", torch.zeros(4, 30, dtype=torch.uint8), 64)
