"""The real candidates on this machine: each that runs meets its accuracy class against the fp32 product."""

from __future__ import annotations

import pytest
import torch

from roofline.kernels import CANDIDATES, Accuracy, KernelUnavailable, LowBitWeights
from roofline.kernels.selector import TOLERANCE
from roofline.quant.functional import quantize_int4, quantize_int8
from roofline.quant.linear import Int4Linear


def int8_weights(n: int = 96, k: int = 128) -> tuple[LowBitWeights, torch.Tensor]:
    w = quantize_int8(torch.randn(n, k, generator=torch.Generator().manual_seed(0)))
    return LowBitWeights("int8", n, k, w.q, w.scale, w.scale.bfloat16()), w.q.float() * w.scale[:, None]


def int4_weights(n: int = 96, k: int = 128) -> tuple[LowBitWeights, torch.Tensor]:
    layer = Int4Linear(k, [n], 32)
    w = quantize_int4(torch.randn(n, k, generator=torch.Generator().manual_seed(0)), 32)
    layer.weight.data.copy_(w.q)
    layer.scale.copy_(w.scale)
    layer.offset.copy_(w.offset)
    layer.finalize()
    return layer.kernel_weights(), layer.reference_weight()


@pytest.mark.parametrize("cand", CANDIDATES, ids=[c.name for c in CANDIDATES])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_candidate_meets_its_accuracy_class(cand, rows):
    w, ref = int8_weights() if cand.weight_format == "int8" else int4_weights()
    try:
        fn = cand.prepare(w)
    except KernelUnavailable:
        pytest.skip(f"{cand.name} unavailable on this build")
    x = torch.randn(rows, w.in_features, generator=torch.Generator().manual_seed(1))
    x[:, ::16] *= 8  # outlier channels
    y = fn(x).float()
    expected = x @ ref.t()
    rel = float((y - expected).abs().max() / expected.abs().max())
    assert rel <= TOLERANCE[cand.accuracy], f"{cand.name}: {rel:.2e}"
    if cand.accuracy == Accuracy.EXACT:
        assert rel <= 5e-4  # fp32-precise: two activation digits (7-bit digits: ~2^-12 of the largest)


def test_exact_kernels_are_row_invariant():
    """A row's result does not depend on the other rows of its batch (per-token digits, pinned scale)."""
    w, _ = int8_weights()
    x = torch.randn(9, w.in_features, generator=torch.Generator().manual_seed(2))
    for cand in CANDIDATES:
        if cand.weight_format != "int8" or cand.accuracy != Accuracy.EXACT:
            continue
        try:
            fn = cand.prepare(w)
        except KernelUnavailable:
            continue
        alone = fn(x[4:5])
        in_batch = fn(x)[4:5]
        torch.testing.assert_close(alone, in_batch, rtol=1e-5, atol=1e-5 * float(alone.abs().max()))


def test_accuracy_parse():
    assert Accuracy.parse("BF16") is Accuracy.BF16
    with pytest.raises(ValueError, match="exact, bf16 or int8"):
        Accuracy.parse("fp8")
