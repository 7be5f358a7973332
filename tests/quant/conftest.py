"""Fixtures for the quantization tests."""

from __future__ import annotations

import copy

import pytest
import torch

from roofline.quant.embedding import Int8Embedding, Int8LMHead
from roofline.quant.linear import Int4Linear, Int8Linear


def _dequantized_copy(float_model: torch.nn.Module, quantized: torch.nn.Module) -> torch.nn.Module:
    """`float_model` with every weight replaced by what the matching low-bit module of `quantized` stores."""
    model = copy.deepcopy(float_model)
    modules = dict(model.named_modules())
    for path, m in quantized.named_modules():
        if isinstance(m, (Int8Linear, Int4Linear)):
            modules[path].weight.data.copy_(m.dequantize())
        elif isinstance(m, Int8Embedding) and path in modules:  # not an untied head's own table
            modules[path].weight.data.copy_(m.qweight.float() * m.scale[:, None])
        elif isinstance(m, Int8LMHead) and not m.is_tied:
            modules[path].weight.data.copy_(m.weights.qweight.float() * m.weights.scale[:, None])
    return model


@pytest.fixture
def dequantized_copy():
    """The function `_dequantized_copy(float_model, quantized_model)`."""
    return _dequantized_copy
