"""Paged decode attention on the head-major cache: writes land in every head's plane, the gathered context
is the sequence's blocks in table order, and attending a few sequences at a time equals one call."""

from __future__ import annotations

import pytest
import torch

from roofline.layers.attention import GATHER_BYTES, attend_decode, gather_blocks, gather_index, seqs_per_gather
from roofline.quant.kv import pack_kv, unpack_kv

HEADS, KV_HEADS, D, BS = 6, 2, 8, 4


def _case(batch: int, lengths: list[int], int8: bool):
    gen = torch.Generator().manual_seed(batch)
    nb = -(-max(lengths) // BS)
    num_blocks = batch * nb + 3
    table = (torch.randperm(num_blocks - 1, generator=gen)[: batch * nb] + 1).view(batch, nb)
    pos = torch.tensor(lengths) - 1  # the new token's position
    slots = table[torch.arange(batch), pos // BS] * BS + pos % BS
    mask = (torch.arange(nb * BS)[None] < torch.tensor(lengths)[:, None])[:, None, None, :]
    q = torch.randn(batch, HEADS, D, generator=gen)
    k, v = (torch.randn(batch, KV_HEADS, D, generator=gen) for _ in range(2))
    caches = [torch.randn(KV_HEADS, num_blocks, BS, D, generator=gen) for _ in range(2)]
    if int8:
        caches = [pack_kv(c) for c in caches]
    return q, k, v, caches, slots, table, mask


def _reference(q, k_cache, v_cache, table, lengths, scale):
    """Per sequence, per query head, softmax over the context read slot by slot through the table."""
    out = torch.empty_like(q)
    group = HEADS // KV_HEADS
    for b, length in enumerate(lengths):
        slots = torch.tensor([int(table[b, t // BS]) * BS + t % BS for t in range(length)])
        for h in range(HEADS):
            kh = h // group
            keys = k_cache[kh].reshape(-1, k_cache.shape[-1])[slots]
            values = v_cache[kh].reshape(-1, v_cache.shape[-1])[slots]
            if k_cache.dtype == torch.int8:
                keys, values = unpack_kv(keys, torch.float32), unpack_kv(values, torch.float32)
            weights = torch.softmax(keys @ q[b, h] * scale, dim=0)
            out[b, h] = weights @ values
    return out


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("seqs_at_once", [None, 1, 2, 3, 8])
def test_decode_matches_reference_in_any_run_of_sequences(int8, seqs_at_once):
    lengths = [1, 7, 12, 5, 9]
    q, k, v, (k_cache, v_cache), slots, table, mask = _case(len(lengths), lengths, int8)
    index = gather_index(table, KV_HEADS, k_cache.shape[1])
    scale = D ** -0.5
    got = attend_decode(q, k, v, k_cache, v_cache, slots, index, mask, scale, seqs_at_once)
    # the new K/V sit at each sequence's slot in every head's plane
    for b in range(len(lengths)):
        block, offset = divmod(int(slots[b]), BS)
        for h in range(KV_HEADS):
            written = k_cache[h, block, offset]
            if int8:
                torch.testing.assert_close(unpack_kv(written, torch.float32), k[b, h], atol=0.05, rtol=0.02)
            else:
                torch.testing.assert_close(written, k[b, h])
    want = _reference(q, k_cache, v_cache, table, lengths, scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_gathered_blocks_are_the_table_in_order_head_by_head():
    q, k, v, (k_cache, _), slots, table, mask = _case(3, [9, 4, 12], int8=False)
    index = gather_index(table, KV_HEADS, k_cache.shape[1])
    gathered = gather_blocks(k_cache, index, 3, D, torch.float32)
    assert gathered.shape == (3, KV_HEADS, table.shape[1] * BS, D) and gathered.is_contiguous()
    for b in range(3):
        for h in range(KV_HEADS):
            torch.testing.assert_close(gathered[b, h], k_cache[h, table[b]].reshape(-1, D))


def test_seqs_per_gather_keeps_a_run_under_the_gather_budget():
    cache = torch.empty(3, 10, 16, 64)
    short = torch.zeros(8, 4, dtype=torch.long)  # 64 tokens: many sequences fit
    long = torch.zeros(8, 64, dtype=torch.long)  # 64 blocks of 16: 768 KiB of keys a sequence
    per_seq_short = 4 * 16 * 3 * 64 * 4
    assert seqs_per_gather(short, cache, 64, torch.float32) == GATHER_BYTES // per_seq_short
    assert seqs_per_gather(long, cache, 64, torch.float32) == 2
    huge = torch.zeros(2, 4096, dtype=torch.long)
    assert seqs_per_gather(huge, cache, 64, torch.float32) == 1
