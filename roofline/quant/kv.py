"""Int8 KV cache: each cached key/value vector as int8 with its own fp32 scale (per token, per head).

The scale travels in the same tensor as the values: a cache slot for one head is D int8 values
followed by the 4 bytes of its fp32 scale, so the cache stays one int8 tensor
[num_kv_heads, num_blocks, block_size, D + 4] and block copies, swaps and prefix sharing move values
and scales together without knowing about either. Memory per token is (D + 4) / (4 D) of fp32:
0.27x for D = 64.
"""

from __future__ import annotations

import torch

KV_SCALE_BYTES = 4  # one fp32 scale per (token, head)
KV_CACHE_DTYPES = ("auto", "int8")


def kv_slot_size(head_dim: int, kv_dtype: torch.dtype) -> int:
    """Last dimension of a cache tensor: head_dim, plus the scale's bytes for int8."""
    return head_dim + KV_SCALE_BYTES if kv_dtype == torch.int8 else head_dim


def pack_kv(x: torch.Tensor) -> torch.Tensor:
    """[..., D] float -> [..., D + 4] int8: round(x / scale) then the bytes of scale = max|x| / 127."""
    scale = torch.linalg.vector_norm(x.float(), ord=float("inf"), dim=-1, keepdim=True).clamp_min_(1e-30) / 127
    q = torch.round(x.float() / scale).to(torch.int8)
    return torch.cat([q, scale.view(torch.int8)], dim=-1)  # the fp32 scale as its 4 bytes


def unpack_kv(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., D + 4] int8 -> [..., D] in `dtype`."""
    values = packed[..., :-KV_SCALE_BYTES]
    scale = packed[..., -KV_SCALE_BYTES:].contiguous().view(torch.float32)  # [..., 1]
    return (values.to(torch.float32) * scale).to(dtype)
