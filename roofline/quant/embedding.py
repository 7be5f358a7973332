"""Int8 token embedding and output head; a tied head multiplies by the embedding's own int8 rows.

The embedding lookup needs whole rows, which int8 per-row keeps cheap to gather (the packed int4
layout does not), and the head is the largest single matmul of a small model (28M of SmolLM2-135M's
135M parameters), so both are int8 in every quantized mode; GGUF files ship them as Q8_0 for the
same reasons. Neither holds an nn.Parameter: `route_tensors` (transform.py) feeds them their
checkpoint tensor, so the model's loader neither expects nor fills them.
"""

from __future__ import annotations

import torch
from torch import nn

from roofline.kernels.candidates import LowBitWeights
from roofline.loaders.gguf import GGMLTensor
from roofline.quant.functional import (INT8_GGML_TYPES, Int8Weight, decode_ggml, dequantize_int8, quantize_int8,
                                       requantize_int8)
from roofline.quant.linear import int8_linear


class Int8Embedding(nn.Module):
    """Token id -> hidden vector, gathered from int8 rows with one scale per row."""

    def __init__(self, vocab_size: int, dim: int, out_dtype: torch.dtype, device: torch.device | None = None) -> None:
        super().__init__()
        self.out_dtype = out_dtype
        self.register_buffer("qweight", torch.zeros(vocab_size, dim, dtype=torch.int8, device=device))  # [V, D]
        self.register_buffer("scale", torch.zeros(vocab_size, device=device))  # [V] fp32
        self.register_buffer("scale_bf16", torch.zeros(vocab_size, dtype=torch.bfloat16, device=device))
        self.is_loaded = False

    def load_tensor(self, tensor: torch.Tensor | GGMLTensor) -> None:
        """Quantize (or decode) the checkpoint's [V, D] embedding matrix."""
        if tuple(tensor.shape) != tuple(self.qweight.shape):
            raise ValueError(f"shape mismatch: checkpoint {tuple(tensor.shape)} vs {tuple(self.qweight.shape)}")
        if isinstance(tensor, GGMLTensor) and tensor.type_name in INT8_GGML_TYPES:
            w = requantize_int8(decode_ggml(tensor.type_name, tensor.blocks, self.qweight.shape[1]))
        else:
            w = quantize_int8(tensor.dequantize() if isinstance(tensor, GGMLTensor) else tensor)
        self.qweight.copy_(w.q)
        self.scale.copy_(w.scale)
        self.scale_bf16.copy_(w.scale)
        self.is_loaded = True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, D]
        rows = self.qweight.index_select(0, ids).to(self.out_dtype)  # index_select: any dtype, any device
        return rows * self.scale.index_select(0, ids)[:, None].to(self.out_dtype)


class Int8LMHead(nn.Module):
    """Hidden vector -> fp32 logits through int8 weights, its own or a tied embedding's."""

    def __init__(self, vocab_size: int, dim: int, tied_to: Int8Embedding | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.is_tied = tied_to is not None
        self.weights = tied_to if tied_to is not None else Int8Embedding(vocab_size, dim, torch.float32, device)
        self.is_head = True  # the selector holds heads to fp32-precise kernels (logits, logprobs)
        self.kernel_table = None  # set by roofline.kernels.select_kernels

    @property
    def is_loaded(self) -> bool:
        """Whether the int8 weights have been filled."""
        return self.weights.is_loaded

    def load_tensor(self, tensor: torch.Tensor | GGMLTensor) -> None:
        """Quantize (or decode) an untied head's [V, D] checkpoint matrix."""
        self.weights.load_tensor(tensor)

    def kernel_weights(self) -> LowBitWeights | None:
        """The int8 rows as kernel candidates consume them (None until loaded)."""
        w = self.weights
        if not w.is_loaded:
            return None
        vocab, dim = w.qweight.shape
        return LowBitWeights("int8", vocab, dim, w.qweight, w.scale, w.scale_bf16)

    def reference_weight(self) -> torch.Tensor:
        """The fp32 weight [V, D] kernels are checked against."""
        return dequantize_int8(Int8Weight(self.weights.qweight, self.weights.scale))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N, V] fp32
        if self.kernel_table is not None and hidden.device.type == "cpu":
            return self.kernel_table(hidden).float()
        # always the integer path, fp32 out: bf16 logits (the weight-only kernel's output) tie near-equal
        # tokens (a step of 1/16 at logit 20) and blur logprobs
        w = self.weights
        return int8_linear(hidden, w.qweight, w.scale, w.scale_bf16, dynamic_min_rows=1).float()
