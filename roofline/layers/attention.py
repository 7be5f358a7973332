"""Attention over a paged KV cache.

The KV cache of one layer is two tensors [num_blocks, block_size, num_kv_heads, head_dim]. Each new
token's key and value are written at its slot (block * block_size + offset), then each sequence
attends to its whole context, gathered block by block through its block table (whole-block copies
run ~6x faster on CPU than per-token indexing); a mask hides the unused tail of the last block.
Decode tokens (one query each) are attended in one padded batch; each prefill chunk on its own.

The decode part (write the new K/V, gather, attend: attend_decode) has no host sync and no
data-dependent branch, so a compiled decode step traces it whole, the context width a dynamic size;
inductor writes the cache in place. (A custom op opaque to the compiler was tried first: its Python
dispatch cost ~115 us a call on a 2-core Xeon, more than the attention itself.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from roofline.quant.kv import pack_kv, unpack_kv


@dataclass
class PrefillChunk:
    """One sequence's block of consecutive query tokens in the flat batch."""

    query_start: int  # first token of the chunk in the flat batch
    query_len: int
    context_len: int  # tokens in the sequence's context once this chunk is written (cached + chunk)
    block_table: torch.Tensor | None  # [num_blocks] blocks of the whole context; None when nothing was cached
    causal_mask: torch.Tensor | None  # [query_len, num_blocks * block_size] bool; None when block_table is None


@dataclass
class AttentionMetadata:
    """Everything attention needs about the batch, built once per step by the input batch."""

    slot_mapping: torch.Tensor  # [num_tokens] where each new token's K/V is written
    num_decode_tokens: int  # decode tokens come first in the flat batch, one per sequence
    decode_block_table: torch.Tensor | None  # [num_decodes, max_blocks] (padding repeats block 0)
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, >= max_blocks * block_size] bool, or 0/-inf
    prefills: list[PrefillChunk] = field(default_factory=list)


class PagedAttention(nn.Module):
    """Scaled dot-product attention of new queries against cached and new keys/values."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        # q [T, H, D]; k, v [T, KVH, D] -> [T, H * D]
        k_cache, v_cache = kv_cache  # [num_blocks, block_size, KVH, D] (int8: D + 4, see quant/kv.py)
        num_decode = meta.num_decode_tokens
        if torch.compiler.is_compiling() or num_decode == q.shape[0]:  # decode-only (every compiled step is)
            return attend_decode(q, k, v, k_cache, v_cache, meta.slot_mapping, meta.decode_block_table,
                                 meta.decode_mask, self.scale).reshape(q.shape[0], self.num_heads * self.head_dim)
        out = torch.empty_like(q)
        if num_decode:
            out[:num_decode] = attend_decode(q[:num_decode], k[:num_decode], v[:num_decode], k_cache, v_cache,
                                             meta.slot_mapping[:num_decode], meta.decode_block_table,
                                             meta.decode_mask, self.scale)
        k_flat = k_cache.view(-1, self.num_kv_heads, k_cache.shape[-1])  # [slots, KVH, D]
        v_flat = v_cache.view(-1, self.num_kv_heads, v_cache.shape[-1])
        new = slice(num_decode, q.shape[0])
        is_int8 = k_cache.dtype == torch.int8
        k_flat.index_copy_(0, meta.slot_mapping[new], pack_kv(k[new]) if is_int8 else k[new].to(k_flat.dtype))
        v_flat.index_copy_(0, meta.slot_mapping[new], pack_kv(v[new]) if is_int8 else v[new].to(v_flat.dtype))
        for chunk in meta.prefills:
            rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
            queries = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, L, D]
            if chunk.block_table is None:  # nothing cached before: the chunk's own K/V, causal
                keys = k[rows].transpose(0, 1).unsqueeze(0)
                values = v[rows].transpose(0, 1).unsqueeze(0)
                attn = F.scaled_dot_product_attention(queries, keys, values, is_causal=True,
                                                      scale=self.scale, enable_gqa=True)
            else:
                keys = gather_blocks(k_cache, chunk.block_table[None], self.head_dim, q.dtype)  # [1, KVH, C, D]
                values = gather_blocks(v_cache, chunk.block_table[None], self.head_dim, q.dtype)
                attn = F.scaled_dot_product_attention(queries, keys, values, attn_mask=chunk.causal_mask,
                                                      scale=self.scale, enable_gqa=True)
            out[rows] = attn.squeeze(0).transpose(0, 1)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)


def gather_blocks(cache: torch.Tensor, block_table: torch.Tensor, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """cache [N, bs, KVH, D'], block_table [B, nb] -> [B, KVH, nb * bs, D] in `dtype` (int8 slots unpacked)."""
    B, nb = block_table.shape
    blocks = cache.index_select(0, block_table.flatten())  # [B * nb, bs, KVH, D']
    if cache.dtype == torch.int8:
        blocks = unpack_kv(blocks, dtype)
    return blocks.view(B, nb * cache.shape[1], cache.shape[2], head_dim).transpose(1, 2).to(dtype)


def attend_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, block_table: torch.Tensor, mask: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """One query per sequence: write its K/V at its slot, attend to its context. q [B, H, D] -> [B, H, D].

    block_table [B, nb], mask [B, 1, 1, nb * bs]: no host sync, so torch.compile traces it (nb a dynamic size).
    """
    kv_heads, slot_size, head_dim = k_cache.shape[2], k_cache.shape[3], q.shape[-1]
    is_int8 = k_cache.dtype == torch.int8
    k_cache.view(-1, kv_heads, slot_size).index_copy_(0, slot_mapping, pack_kv(k) if is_int8 else k.to(k_cache.dtype))
    v_cache.view(-1, kv_heads, slot_size).index_copy_(0, slot_mapping, pack_kv(v) if is_int8 else v.to(v_cache.dtype))
    keys = gather_blocks(k_cache, block_table, head_dim, q.dtype)  # [B, KVH, C, D]
    values = gather_blocks(v_cache, block_table, head_dim, q.dtype)
    attn = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale,
                                          enable_gqa=True)
    return attn.squeeze(2)
