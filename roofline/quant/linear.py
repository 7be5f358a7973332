"""Weight-quantized linear layers: int8 per output channel and int4 group-wise.

Both subclass `roofline.layers.linear.Linear`, so the model's weight loader fills them the same way
(packed shards included): `load()` takes a floating-point tensor, which it quantizes, or a GGUF
tensor's raw blocks (`GGMLTensor`), which it decodes straight into the low-bit format.
`finalize()` runs once every shard is in and lays the weight out for the kernel.

Kernels on the CPU (measured choice, docs/quantization.md): torch's `_weight_int8pack_mm` and
`_weight_int4pack_mm_for_cpu` with bf16 activations (their fp32-activation paths are scalar and
10-50x slower); for int8 on batches of `DYNAMIC_INT8_MIN_ROWS` rows or more, and always for the
output head, int8 x int8 GEMMs (`torch._int_mm`) on activations split into two int8 digits. Other
devices dequantize to the activation dtype and call F.linear: correct and compact in memory, but not
a fast path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from roofline.kernels.candidates import INT8_PACK_COL_MULTIPLE, LowBitWeights, int8_activation_mm
from roofline.layers.linear import Linear
from roofline.loaders.gguf import GGMLTensor
from roofline.quant.functional import (INT4_GGML_TYPES, INT8_GGML_TYPES, Int4Weight, Int8Weight, decode_ggml,
                                       dequantize_int4, quantize_int4, quantize_int8, requantize_int8)

INT4_PACK_ROW_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs N % 16 == 0


# From this many rows up, int8 activations x int8 weights (`torch._int_mm`) beat the weight-only kernel,
# whose cost grows linearly with the rows (2-4x faster at 32 rows); below it, quantizing the
# activations (a dozen small ops) costs more than the GEMV it saves.
DYNAMIC_INT8_MIN_ROWS = 16


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, scale_bf16: torch.Tensor,
                dynamic_min_rows: int = DYNAMIC_INT8_MIN_ROWS, use_cpu_kernels: bool = True) -> torch.Tensor:
    """x [T, K] @ (scale[:, None] * q [N, K])^T -> [T, N] in x's dtype.

    T >= `dynamic_min_rows`: integer GEMMs on x split into two int8 digits (`int8_activation_mm`),
    fp32-precise. Fewer rows: the weight-only kernel on bf16 activations (bf16 output). Each path
    gives a row the same result alone or in any batch that takes the same path. Off the CPU (or with
    `use_cpu_kernels` False): dequantize to x's dtype and F.linear.
    """
    if not use_cpu_kernels or x.device.type != "cpu" or q.shape[1] % INT8_PACK_COL_MULTIPLE:
        return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    if x.shape[0] >= dynamic_min_rows:
        return int8_activation_mm(x, q, scale).to(x.dtype)
    return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, scale_bf16).to(x.dtype)




class Int8Linear(Linear):
    """Linear layer with int8 weights and one fp32 scale per output channel."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 device: torch.device | None = None) -> None:
        with torch.device("meta"):
            super().__init__(in_features, output_sizes, bias)
        self.weight = nn.Parameter(torch.zeros(self.out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=device), requires_grad=False) if bias else None
        self.register_buffer("scale", torch.zeros(self.out_features, device=device))  # [N] fp32
        self.register_buffer("scale_bf16", torch.zeros(self.out_features, dtype=torch.bfloat16, device=device))
        self.use_cpu_kernels = True  # False: the generic dequantize-and-matmul path other devices take
        self.kernel_table = None  # set by roofline.kernels.select_kernels: the measured kernel per row bucket

    def load(self, param_name: str, tensor: torch.Tensor | GGMLTensor, shard: int = 0) -> None:
        """Quantize (or decode) a checkpoint tensor into one shard of the weight, or copy a bias."""
        if param_name != "weight":
            return super().load(param_name, _as_float(tensor), shard)
        rows = self.shard_rows(shard)
        if tuple(tensor.shape) != (rows.stop - rows.start, self.in_features):
            raise ValueError(f"shape mismatch: checkpoint {tuple(tensor.shape)} vs layer shard "
                             f"{(rows.stop - rows.start, self.in_features)}")
        if isinstance(tensor, GGMLTensor) and tensor.type_name in INT8_GGML_TYPES:
            w = requantize_int8(decode_ggml(tensor.type_name, tensor.blocks, self.in_features))
        else:
            w = quantize_int8(_as_float(tensor))
        self.weight.data[rows] = w.q.to(self.weight.device)
        self.scale[rows] = w.scale.to(self.scale.device)

    def finalize(self) -> None:
        """Derive the kernel's bf16 scales once every shard is loaded."""
        self.scale_bf16.copy_(self.scale)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [N, K] this layer multiplies by."""
        return self.weight.float() * self.scale[:, None]

    def kernel_weights(self) -> LowBitWeights:
        """The weights as kernel candidates consume them."""
        return LowBitWeights("int8", self.out_features, self.in_features, self.weight.data, self.scale,
                             self.scale_bf16)

    def reference_weight(self) -> torch.Tensor:
        """The fp32 weight [N, K] kernels are checked against."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        if self.kernel_table is not None and x.device.type == "cpu":
            y = self.kernel_table(x).to(x.dtype)
        else:
            y = int8_linear(x, self.weight, self.scale, self.scale_bf16, use_cpu_kernels=self.use_cpu_kernels)
        return y if self.bias is None else y + self.bias


class Int4Linear(Linear):
    """Linear layer with 4-bit weights and a (scale, zero) pair per output channel and group of inputs."""

    def __init__(self, in_features: int, output_sizes: list[int], group_size: int, bias: bool = False,
                 device: torch.device | None = None) -> None:
        with torch.device("meta"):
            super().__init__(in_features, output_sizes, bias)
        if in_features % group_size or self.out_features % INT4_PACK_ROW_MULTIPLE:
            raise ValueError(f"int4 needs in_features ({in_features}) divisible by the group size ({group_size}) "
                             f"and out_features ({self.out_features}) by {INT4_PACK_ROW_MULTIPLE}")
        self.group_size = group_size
        num_groups = in_features // group_size
        # while loading: one 4-bit value per byte; finalize() packs two per byte in the kernel's layout
        self.weight = nn.Parameter(torch.zeros(self.out_features, in_features, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=device), requires_grad=False) if bias else None
        self.register_buffer("scale", torch.zeros(self.out_features, num_groups, device=device))  # [N, G] fp32
        self.register_buffer("offset", torch.zeros(self.out_features, num_groups, device=device))
        self.register_buffer("scales_and_zeros", None)  # [G, N, 2] bf16 once finalized
        self.is_packed = False
        self.loaded_shards: set[int] = set()
        # the CPU kernel's packed layout, else plain nibble pairs and dequantize-and-matmul (other devices)
        self.use_cpu_kernels = self.weight.device.type == "cpu"
        self.kernel_table = None  # set by roofline.kernels.select_kernels: the measured kernel per row bucket

    def load(self, param_name: str, tensor: torch.Tensor | GGMLTensor, shard: int = 0) -> None:
        """Quantize (or decode) a checkpoint tensor into one shard of the weight, or copy a bias."""
        if param_name != "weight":
            return super().load(param_name, _as_float(tensor), shard)
        if self.is_packed:
            raise RuntimeError("Int4Linear.load after finalize()")
        rows = self.shard_rows(shard)
        if tuple(tensor.shape) != (rows.stop - rows.start, self.in_features):
            raise ValueError(f"shape mismatch: checkpoint {tuple(tensor.shape)} vs layer shard "
                             f"{(rows.stop - rows.start, self.in_features)}")
        if (isinstance(tensor, GGMLTensor) and tensor.type_name in INT4_GGML_TYPES
                and self.group_size == 32):
            w = decode_ggml(tensor.type_name, tensor.blocks, self.in_features)
        else:
            w = quantize_int4(_as_float(tensor), self.group_size)
        self.weight.data[rows] = w.q.to(self.weight.device)
        self.scale[rows] = w.scale.to(self.scale.device)
        self.offset[rows] = w.offset.to(self.offset.device)
        self.loaded_shards.add(shard)
        if len(self.loaded_shards) == len(self.output_sizes):
            self.finalize()  # pack now: the unpacked byte-per-value copy of every layer never coexists

    def finalize(self) -> None:
        """Pack the 4-bit values for the kernel and fold (scale, offset) into its (scale, zero) pairs."""
        if self.is_packed:
            return
        # the kernel computes w = (q - 8) * scale + zero, so zero = offset + 8 * scale
        zeros = self.offset + 8 * self.scale
        self.scales_and_zeros = torch.stack([self.scale, zeros], dim=-1).transpose(0, 1).contiguous().to(
            torch.bfloat16)  # [G, N, 2]
        q = self.weight.data
        if self.use_cpu_kernels:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        else:
            packed = q[:, 0::2] | (q[:, 1::2] << 4)  # [N, K / 2]: plain nibble pairs for the fallback
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.scale = self.offset = None  # the bf16 pairs replace them
        self.is_packed = True

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] this layer multiplies by, in fp32 (bf16-rounded scales once finalized)."""
        if not self.is_packed:
            return dequantize_int4(Int4Weight(self.weight.data, self.scale, self.offset, self.group_size))
        if self.use_cpu_kernels:  # unpack through the kernel: I @ W^T = W^T
            eye = torch.eye(self.in_features, dtype=torch.bfloat16)
            return self.forward_packed(eye).float().t().contiguous()
        w = self.weight.data
        q = torch.stack([w & 0x0F, w >> 4], dim=-1).reshape(self.out_features, self.in_features)
        return self._dequantize_nibbles(q).float()

    def _dequantize_nibbles(self, q: torch.Tensor) -> torch.Tensor:
        sz = self.scales_and_zeros  # [G, N, 2]
        scale = sz[..., 0].t().repeat_interleave(self.group_size, dim=1)  # [N, K]
        zero = sz[..., 1].t().repeat_interleave(self.group_size, dim=1)
        return (q.to(sz.dtype) - 8) * scale + zero

    def forward_packed(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] -> [T, N] in bf16 through the CPU int4 kernel."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.weight, self.group_size,
                                                          self.scales_and_zeros)

    def kernel_weights(self) -> LowBitWeights | None:
        """The packed weights as kernel candidates consume them (None before packing or off the CPU layout)."""
        if not (self.is_packed and self.use_cpu_kernels):
            return None
        return LowBitWeights("int4", self.out_features, self.in_features, self.weight.data,
                             group_size=self.group_size, scales_and_zeros=self.scales_and_zeros)

    def reference_weight(self) -> torch.Tensor:
        """The fp32 weight [N, K] kernels are checked against."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        if not self.is_packed:
            raise RuntimeError("Int4Linear used before finalize()")
        if self.kernel_table is not None and x.device.type == "cpu":
            y = self.kernel_table(x).to(x.dtype)
        elif self.use_cpu_kernels:
            y = self.forward_packed(x).to(x.dtype)
        else:
            w = self.weight.data
            q = torch.stack([w & 0x0F, w >> 4], dim=-1).reshape(self.out_features, self.in_features)
            y = F.linear(x, self._dequantize_nibbles(q).to(x.dtype))
        return y if self.bias is None else y + self.bias


def _as_float(tensor: torch.Tensor | GGMLTensor) -> torch.Tensor:
    return tensor.dequantize() if isinstance(tensor, GGMLTensor) else tensor.float()


__all__ = ["Int4Linear", "Int8Linear", "Int8Weight", "int8_linear"]
