"""Linear layers, including packed ones (q/k/v, gate/up) that load several checkpoint tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x W^T (+ b); `output_sizes` lists the row blocks of a packed weight (one per checkpoint shard)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        self.out_features = sum(output_sizes)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None

    def shard_rows(self, shard: int) -> slice:
        """Rows of the packed weight that checkpoint shard `shard` fills."""
        start = sum(self.output_sizes[:shard])
        return slice(start, start + self.output_sizes[shard])

    def load(self, param_name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        """Copy a checkpoint tensor into this layer's `weight` or `bias` (or one shard of it)."""
        param = getattr(self, param_name)
        if param is None:
            raise ValueError(f"the checkpoint has a {param_name} this layer does not")
        target = param.data[self.shard_rows(shard)] if len(self.output_sizes) > 1 else param.data
        if target.shape != tensor.shape:
            raise ValueError(f"shape mismatch: checkpoint {tuple(tensor.shape)} vs layer {tuple(target.shape)}")
        target.copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return F.linear(x, self.weight, self.bias)
