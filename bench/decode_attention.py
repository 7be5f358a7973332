"""Paged decode attention per layer: the engine's head-major KV layout against the token-major one it replaced.

    python bench/decode_attention.py [--batches 1,16,64] [--contexts 256,1024] [--compile]

One decode step of one layer (write the new K/V, gather the context's blocks, SDPA), the default model's
attention shape (9 query heads, 3 KV heads, head_dim 64, fp32, blocks of 16 scattered over the cache).
  - token-major: cache [blocks, 16, kv_heads, D]; the gathered context is a transposed view
    [B, kv_heads, C, D] whose rows are kv_heads * D apart, and the query heads repeat K/V (enable_gqa);
  - head-major (roofline.layers.attention.attend_decode): cache [kv_heads, blocks, 16, D]; the gathered
    context [B, kv_heads, C, D] is contiguous, a KV head's query heads are its query rows, and eager
    attends a few sequences at a time once the contexts outgrow GATHER_BYTES (compiled: one call).
Best of 7 rounds, milliseconds per layer; the ratio is token-major / head-major in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
import torch.nn.functional as F
from machine import cpu_name

from roofline.layers.attention import attend_decode, gather_index, seqs_per_gather

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16


def token_major(q, k, v, k_cache, v_cache, slots, table, mask, scale):
    """The replaced layout, kept here as the baseline: cache [N, bs, KVH, D]."""
    k_cache.view(-1, KV_HEADS, HEAD_DIM).index_copy_(0, slots, k)
    v_cache.view(-1, KV_HEADS, HEAD_DIM).index_copy_(0, slots, v)
    B, nb = table.shape
    keys = k_cache.index_select(0, table.flatten()).view(B, nb * BLOCK, KV_HEADS, HEAD_DIM).transpose(1, 2)
    values = v_cache.index_select(0, table.flatten()).view(B, nb * BLOCK, KV_HEADS, HEAD_DIM).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(2)


def inputs(batch: int, context: int):
    gen = torch.Generator().manual_seed(0)
    nb = -(-context // BLOCK)
    num_blocks = 2 * batch * nb + 1
    table = (torch.randperm(num_blocks - 1, generator=gen)[: batch * nb] + 1).view(batch, nb)
    slots = table[:, (context - 1) // BLOCK] * BLOCK + (context - 1) % BLOCK
    mask = (torch.arange(nb * BLOCK)[None] < context).expand(batch, -1)[:, None, None, :].contiguous()
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen)
    k, v = (torch.randn(batch, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    cache = [torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2)]
    head_major = [c.permute(2, 0, 1, 3).contiguous() for c in cache]
    return q, k, v, cache, head_major, slots, table, mask


def best_ms(fn, rounds: int = 7) -> float:
    fn()
    fn()
    calls, best = 1, float("inf")
    start = time.perf_counter()
    while time.perf_counter() - start < 0.05 and calls < 2000:  # calls per round: ~50 ms of work
        fn()
        calls += 1
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--contexts", default="256,1024")
    parser.add_argument("--compile", action="store_true", help="also both layouts through torch.compile")
    args = parser.parse_args()
    print(f"{datetime.date.today()}  {cpu_name()}  dispatch {torch.backends.cpu.get_cpu_capability()}  "
          f"{torch.get_num_threads()} threads  torch {torch.__version__}")
    modes = [("eager", token_major, attend_decode, True)]
    if args.compile:  # a compiled step attends every sequence in one call
        modes.append(("compiled", torch.compile(token_major, dynamic=True), torch.compile(attend_decode, dynamic=True),
                      False))
    print("| mode | sequences | context | token-major ms | head-major ms | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    scale = HEAD_DIM ** -0.5
    with torch.inference_mode():
        for batch in map(int, args.batches.split(",")):
            for context in map(int, args.contexts.split(",")):
                q, k, v, cache, head_major, slots, table, mask = inputs(batch, context)
                index = gather_index(table, KV_HEADS, head_major[0].shape[1])
                want = token_major(q, k, v, *cache, slots, table, mask, scale)
                at_once = seqs_per_gather(table, head_major[0], HEAD_DIM, q.dtype)
                got = attend_decode(q, k, v, *head_major, slots, index, mask, scale, at_once)
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
                for mode, old, new, eager in modes:
                    old_ms = best_ms(lambda: old(q, k, v, *cache, slots, table, mask, scale))
                    new_ms = best_ms(lambda: new(q, k, v, *head_major, slots, index, mask, scale,
                                                 at_once if eager else None))
                    print(f"| {mode} | {batch} | {context} | {old_ms:.3f} | {new_ms:.3f} | {old_ms / new_ms:.2f}x |",
                          flush=True)


if __name__ == "__main__":
    main()
