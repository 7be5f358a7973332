"""Rotary position embeddings (rotate-half layout) with linear, llama3 and per-frequency scaling."""

from __future__ import annotations

import math

import torch
from torch import nn

from roofline.errors import ConfigError


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32, after the configured scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        pass
    elif kind == "freq_factors":  # one divisor per frequency, as GGUF files store llama3 scaling
        factors = torch.tensor(scaling["factors"], dtype=torch.float64)
        if factors.shape != inv_freq.shape:
            raise ConfigError(f"rope: {factors.numel()} frequency factors for {inv_freq.numel()} frequencies")
        inv_freq = inv_freq / factors
    elif kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    else:
        raise ConfigError(f"rope scaling {kind!r} is not supported; "
                          f"supported: default, linear, llama3, freq_factors")
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    """Rotary embeddings from a precomputed table: gathered once per step, applied to q and k in every layer."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, D/2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def gather(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [T, 1, D] for the step's positions [T]: one gather per step, shared by every layer.

        Full width, with the sign of rotate-half folded into sin, so a layer rotates with four ops.
        """
        cos = self.cos.index_select(0, positions)  # [T, D/2]
        sin = self.sin.index_select(0, positions)
        cos = torch.cat((cos, cos), dim=-1).to(dtype).unsqueeze(1)
        sin = torch.cat((-sin, sin), dim=-1).to(dtype).unsqueeze(1)
        return cos, sin


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate x [T, heads, D] (rotate-half layout) by the step's (cos, sin) [T, 1, D]."""
    cos, sin = rope
    half = x.shape[-1] // 2
    # the same products and sums as x * cos + rotate_half(x) * sin, in the same order: fp32-identical
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin
