"""Quantize and dequantize weights, and decode GGML quantized blocks, as pure tensor functions.

Two formats, both chosen because a maintained CPU kernel consumes them (see docs/quantization.md):

- int8, per output channel, symmetric: w[n, k] = scale[n] * q[n, k], q in [-127, 127].
- int4, group-wise along the input dimension, affine: w[n, k] = scale[n, g] * q[n, k] + offset[n, g]
  with g = k // group_size and q in [0, 15]. This is GGML's Q4_1 exactly, Q4_0 with
  offset = -8 * scale, and each 32-wide sub-block of Q4_K.

GGML blocks are decoded straight from their bytes into these formats (no fp32 copy of the weight).
Q8_0's per-32 scales have no int8 kernel, so `requantize_int8` folds them into one scale per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GGML_BLOCK_BYTES = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34), "Q4_K": (256, 144)}  # elems, bytes
INT4_GGML_TYPES = ("Q4_0", "Q4_1", "Q4_K")  # decode exactly to int4 group 32
INT8_GGML_TYPES = ("Q8_0",)  # decode to int8 with per-32 scales


@dataclass
class Int8Weight:
    """Symmetric int8 weight with one scale per row, or per `group_size` columns when group_size is set."""

    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N] fp32, or [N, K // group_size] when grouped
    group_size: int | None = None


@dataclass
class Int4Weight:
    """Affine 4-bit weight, one (scale, offset) per row and group of `group_size` columns."""

    q: torch.Tensor  # [N, K] uint8 in [0, 15], one value per byte (packed later, for the kernel)
    scale: torch.Tensor  # [N, K // group_size] fp32
    offset: torch.Tensor  # [N, K // group_size] fp32: the value of q = 0
    group_size: int


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Round each row of `w` [N, K] to int8 with scale max|row| / 127 (error <= scale / 2)."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(q, scale)


def dequantize_int8(w: Int8Weight) -> torch.Tensor:
    """The fp32 weight [N, K] an Int8Weight stands for."""
    if w.group_size is None:
        return w.q.float() * w.scale[:, None]
    return w.q.float() * w.scale.repeat_interleave(w.group_size, dim=1)


def requantize_int8(w: Int8Weight, rows_per_chunk: int = 4096) -> Int8Weight:
    """Grouped int8 (GGML Q8_0) -> one scale per row; error <= new scale / 2 on top of the input's."""
    if w.group_size is None:
        return w
    N = w.q.shape[0]
    q = torch.empty_like(w.q)
    scale = torch.empty(N, dtype=torch.float32, device=w.q.device)
    tiny = torch.finfo(torch.float32).tiny
    for start in range(0, N, rows_per_chunk):  # chunks bound the fp32 temporary
        rows = slice(start, start + rows_per_chunk)
        # quantize_int8(dequantize_int8(...)) computed in place on one temporary: the same fp32 values
        # (products, row maxima, quotients) bit for bit, at a fraction of the load time of a 49152-row head
        part = w.q[rows].float()
        r, K = part.shape
        part.view(r, K // w.group_size, w.group_size).mul_(w.scale[rows][..., None])
        row_scale = part.abs().amax(dim=1).clamp_min(tiny) / 127
        part.div_(row_scale[:, None]).round_().clamp_(-127, 127)
        q[rows], scale[rows] = part.to(torch.int8), row_scale
    return Int8Weight(q, scale)


def quantize_int4(w: torch.Tensor, group_size: int) -> Int4Weight:
    """Round `w` [N, K] to 4 bits per value with a min/max affine map per group (GGML Q4_1's rule)."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"input size {K} is not a multiple of the int4 group size {group_size}")
    groups = w.float().reshape(N, K // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = (hi - lo) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: every q is 0
    q = torch.round((groups - lo[..., None]) / safe[..., None]).clamp_(0, 15).to(torch.uint8)
    return Int4Weight(q.reshape(N, K), scale, lo, group_size)


def dequantize_int4(w: Int4Weight) -> torch.Tensor:
    """The fp32 weight [N, K] an Int4Weight stands for."""
    N, K = w.q.shape
    groups = w.q.float().reshape(N, K // w.group_size, w.group_size)
    return (groups * w.scale[..., None] + w.offset[..., None]).reshape(N, K)


def decode_ggml(type_name: str, blocks: torch.Tensor, num_cols: int) -> Int4Weight | Int8Weight:
    """Decode the raw GGML blocks of a 2-D tensor, `blocks` [N, bytes_per_row] uint8, without dequantizing.

    Q4_0, Q4_1 and Q4_K become an Int4Weight with group 32; Q8_0 an Int8Weight with group 32.
    """
    if type_name not in GGML_BLOCK_BYTES:
        raise ValueError(f"GGML type {type_name} has no direct low-bit mapping")
    elems, nbytes = GGML_BLOCK_BYTES[type_name]
    N = blocks.shape[0]
    if num_cols % elems or blocks.shape[1] != num_cols // elems * nbytes:
        raise ValueError(f"{type_name}: {blocks.shape[1]} bytes per row do not hold {num_cols} values")
    b = blocks.reshape(N, num_cols // elems, nbytes)  # [N, blocks per row, bytes per block]
    if type_name == "Q8_0":
        d = _f16(b[..., 0:2])
        q = b[..., 2:].contiguous().view(torch.int8).reshape(N, num_cols)
        return Int8Weight(q, d, 32)
    if type_name == "Q4_K":
        return _decode_q4_k(b, num_cols)
    d = _f16(b[..., 0:2])
    offset = -8 * d if type_name == "Q4_0" else _f16(b[..., 2:4])
    q = _nibbles(b[..., -16:])  # [N, blocks, 32]: low nibbles are values 0-15, high nibbles 16-31
    return Int4Weight(q.reshape(N, num_cols), d, offset, 32)


def _f16(two_bytes: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 little-endian fp16 -> [...] fp32."""
    return two_bytes.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., n] uint8 -> [..., 2n]: the n low nibbles, then the n high nibbles."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def _decode_q4_k(b: torch.Tensor, num_cols: int) -> Int4Weight:
    # Q4_K super-block of 256: fp16 d, fp16 dmin, 12 bytes of 6-bit (scale, min) pairs for 8
    # sub-blocks of 32, then 128 bytes of nibbles (each 32-byte run: sub-block 2j low, 2j+1 high).
    # value = d * sc[j] * q - dmin * m[j]: an affine map per 32 values.
    N, num_blocks = b.shape[0], b.shape[1]
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    s = b[..., 4:16].to(torch.int32).reshape(N, num_blocks, 3, 4)
    lo, hi, mixed = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = torch.cat([lo & 0x3F, (mixed & 0x0F) | ((lo >> 2) & 0x30)], dim=-1)  # [N, blocks, 8]
    mn = torch.cat([hi & 0x3F, (mixed >> 4) | ((hi >> 2) & 0x30)], dim=-1)
    q = _nibbles(b[..., 16:].reshape(N, num_blocks, 4, 32))  # [N, blocks, 4, 64]
    scale = (d[..., None] * sc.float()).reshape(N, -1)
    offset = (-dmin[..., None] * mn.float()).reshape(N, -1)
    return Int4Weight(q.reshape(N, num_cols), scale, offset, 32)
