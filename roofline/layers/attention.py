"""Attention over a paged KV cache.

The KV cache of one layer is two tensors [num_kv_heads, num_blocks, block_size, head_dim], head-major:
gathering a block of every head (gather_index) gives a contiguous [batch, kv_heads, context, head_dim],
which SDPA reads ~1.6x faster than the transposed view a token-major cache [blocks, block_size,
kv_heads, head_dim] gives (2-core EPYC Zen 4, 64 sequences; bench/decode_attention.py compares them).
Each new token's key and value are written at its slot (block * block_size + offset) in every head's
plane, then each sequence attends to its whole context, gathered block by block through its block table
(whole-block copies run ~6x faster on CPU than per-token indexing); a mask hides the unused tail of the
last block. Decode tokens (one query each) are attended in one padded batch, a KV head's query heads as
its query rows (K/V never repeated per query head), a few sequences at a time in eager steps once their
contexts outgrow the CPU cache (GATHER_BYTES); each prefill chunk on its own.

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

# Keys an eager decode gathers at a time (values as many): contexts larger than this are attended a few
# sequences at a time, so the gathered blocks are read back from cache, not memory. 64 sequences of 1024
# tokens ran 3.6x faster in runs of 2 than in one call (2-core EPYC Zen 4, bench/decode_attention.py).
GATHER_BYTES = 2 << 20


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
    # the decode block table as rows of the flattened [kv_heads * blocks] cache, made by the first layer
    # of an eager step and read by the others (one op per step, not one per layer)
    decode_gather_index: torch.Tensor | None = field(default=None, repr=False)


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
        k_cache, v_cache = kv_cache  # [KVH, num_blocks, block_size, D] (int8: D + 4, see quant/kv.py)
        num_decode = meta.num_decode_tokens
        compiling = torch.compiler.is_compiling()
        index = None
        if num_decode:
            if compiling:  # inside the graph: fused into the gather
                index = gather_index(meta.decode_block_table, self.num_kv_heads, k_cache.shape[1])
            else:
                if meta.decode_gather_index is None:
                    meta.decode_gather_index = gather_index(meta.decode_block_table, self.num_kv_heads,
                                                            k_cache.shape[1])
                index = meta.decode_gather_index
            # eager: a few sequences at a time once their contexts outgrow the cache (one graph when compiled)
            at_once = None if compiling else seqs_per_gather(meta.decode_block_table, k_cache, self.head_dim, q.dtype)
        if compiling or num_decode == q.shape[0]:  # decode-only (every compiled step is)
            return attend_decode(q, k, v, k_cache, v_cache, meta.slot_mapping, index, meta.decode_mask,
                                 self.scale, at_once).reshape(q.shape[0], self.num_heads * self.head_dim)
        out = torch.empty_like(q)
        if num_decode:
            out[:num_decode] = attend_decode(q[:num_decode], k[:num_decode], v[:num_decode], k_cache, v_cache,
                                             meta.slot_mapping[:num_decode], index, meta.decode_mask, self.scale,
                                             at_once)
        new = slice(num_decode, q.shape[0])
        write_kv(k_cache, v_cache, meta.slot_mapping[new], k[new], v[new])
        for chunk in meta.prefills:
            rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
            queries = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, L, D]
            if chunk.block_table is None:  # nothing cached before: the chunk's own K/V, causal
                keys = k[rows].transpose(0, 1).unsqueeze(0)
                values = v[rows].transpose(0, 1).unsqueeze(0)
                attn = F.scaled_dot_product_attention(queries, keys, values, is_causal=True,
                                                      scale=self.scale, enable_gqa=True)
            else:
                index = gather_index(chunk.block_table[None], self.num_kv_heads, k_cache.shape[1])
                keys = gather_blocks(k_cache, index, 1, self.head_dim, q.dtype)  # [1, KVH, C, D]
                values = gather_blocks(v_cache, index, 1, self.head_dim, q.dtype)
                attn = F.scaled_dot_product_attention(queries, keys, values, attn_mask=chunk.causal_mask,
                                                      scale=self.scale, enable_gqa=True)
            out[rows] = attn.squeeze(0).transpose(0, 1)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)


def gather_index(block_table: torch.Tensor, kv_heads: int, num_blocks: int) -> torch.Tensor:
    """block_table [B, nb] -> [B * KVH * nb]: rows of a cache viewed as [KVH * num_blocks, bs, D'] (head h's
    copy of block b is row h * num_blocks + b), sequence-major, so the gathered blocks are [B, KVH, nb * bs, D']
    contiguous and a run of sequences is a slice."""
    heads = torch.arange(kv_heads, device=block_table.device)[None, :, None] * num_blocks
    return (heads + block_table[:, None, :]).flatten()


def gather_blocks(cache: torch.Tensor, index: torch.Tensor, batch: int, head_dim: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """cache [KVH, N, bs, D'], index from gather_index -> [batch, KVH, nb * bs, D] in `dtype` (int8 unpacked)."""
    kv_heads, num_blocks, block_size, slot_size = cache.shape
    blocks = cache.view(kv_heads * num_blocks, block_size, slot_size).index_select(0, index)  # [B*KVH*nb, bs, D']
    if cache.dtype == torch.int8:
        blocks = unpack_kv(blocks, dtype)
    return blocks.view(batch, kv_heads, -1, head_dim).to(dtype)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """Write k, v [T, KVH, D] at `slots` [T] (block * block_size + offset) of every head's plane."""
    kv_heads, slot_size = k_cache.shape[0], k_cache.shape[-1]
    is_int8 = k_cache.dtype == torch.int8
    for cache, x in ((k_cache, k), (v_cache, v)):
        x = pack_kv(x) if is_int8 else x.to(cache.dtype)
        cache.view(kv_heads, -1, slot_size).index_copy_(1, slots, x.transpose(0, 1))


def seqs_per_gather(block_table: torch.Tensor, kv_cache: torch.Tensor, head_dim: int, dtype: torch.dtype) -> int:
    """How many sequences an eager decode gathers and attends at a time: GATHER_BYTES of keys (and as many
    of values), so what the gather writes is still in cache when SDPA reads it."""
    context_bytes = block_table.shape[1] * kv_cache.shape[2] * kv_cache.shape[0] * head_dim * dtype.itemsize
    return max(1, GATHER_BYTES // context_bytes)


def attend_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, index: torch.Tensor, mask: torch.Tensor, scale: float,
                  seqs_at_once: int | None = None) -> torch.Tensor:
    """One query per sequence: write its K/V at its slot, attend to its context. q [B, H, D] -> [B, H, D].

    index: gather_index of the block table [B, nb]; mask [B, 1, 1, nb * bs]. The H / KVH query heads of a
    KV head are that head's query rows (no K/V repeated per query head). seqs_at_once (eager): attend that
    many sequences at a time (seqs_per_gather); None: all in one call. No host sync, so torch.compile
    traces it (nb a dynamic size).
    """
    B, heads, head_dim = q.shape
    kv_heads = k_cache.shape[0]
    write_kv(k_cache, v_cache, slot_mapping, k, v)
    queries = q.view(B, kv_heads, heads // kv_heads, head_dim)  # [B, KVH, H / KVH, D]
    if seqs_at_once is None or seqs_at_once >= B:
        return _attend_gathered(queries, k_cache, v_cache, index, mask, scale).reshape(B, heads, head_dim)
    out = torch.empty_like(queries)
    per_seq = index.shape[0] // B
    for start in range(0, B, seqs_at_once):
        rows = slice(start, start + seqs_at_once)
        out[rows] = _attend_gathered(queries[rows], k_cache, v_cache,
                                     index[start * per_seq:(start + seqs_at_once) * per_seq], mask[rows], scale)
    return out.reshape(B, heads, head_dim)


def _attend_gathered(queries: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, index: torch.Tensor,
                     mask: torch.Tensor, scale: float) -> torch.Tensor:
    batch, head_dim = queries.shape[0], queries.shape[-1]
    keys = gather_blocks(k_cache, index, batch, head_dim, queries.dtype)  # [b, KVH, C, D]
    values = gather_blocks(v_cache, index, batch, head_dim, queries.dtype)
    return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
