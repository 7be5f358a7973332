"""KVCacheManager as pure bookkeeping: block counts, reference counts, prefix hits, eviction, fork, swap."""

from __future__ import annotations

import random

import pytest

from roofline.engine.kv_cache import KVCacheManager, hash_block
from roofline.engine.request import Request
from roofline.sampling_params import SamplingParams

BS = 4  # small blocks keep the arithmetic readable


def make_request(request_id: str, token_ids: list[int]) -> Request:
    """A request over `token_ids` with no KV computed yet."""
    return Request(request_id, list(token_ids), SamplingParams(), max_tokens=16, eos_token_ids=[])


def admit(kv: KVCacheManager, request: Request) -> int:
    """Schedule the whole prompt as the scheduler would (prefix lookup, allocate) and mark it computed."""
    cached = kv.find_cached_prefix(request)
    num_cached = len(cached) * kv.block_size
    assert kv.allocate(request, request.num_tokens - num_cached, cached)
    kv.record_prefix_lookup(request, num_cached)
    request.num_computed_tokens = request.num_tokens
    return num_cached


def decode(kv: KVCacheManager, request: Request, token: int) -> None:
    """Append one generated token and give it KV room, as one decode step does."""
    request.output_token_ids.append(token)
    assert kv.allocate(request, 1)
    request.num_computed_tokens += 1


def assert_all_free(kv: KVCacheManager) -> None:
    assert kv.num_free_blocks == kv.num_blocks
    assert all(c == 0 for c in kv.pool.ref_counts)
    assert not kv.block_tables and not kv.swap_tables


def test_blocks_needed_rounds_up():
    kv = KVCacheManager(8, BS)
    assert [kv.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_grows_table_one_block_at_a_boundary():
    kv = KVCacheManager(8, BS, enable_prefix_caching=False)
    r = make_request("a", list(range(10)))  # 10 tokens: 3 blocks
    admit(kv, r)
    assert len(kv.block_tables["a"]) == 3
    assert kv.num_free_blocks == 5
    decode(kv, r, 100)  # 11 tokens still fit 3 blocks
    decode(kv, r, 101)  # 12
    assert len(kv.block_tables["a"]) == 3
    decode(kv, r, 102)  # 13: a fourth block
    assert len(kv.block_tables["a"]) == 4
    assert kv.num_free_blocks == 4
    assert kv.usage == pytest.approx(0.5)


def test_allocate_fails_cleanly_when_short():
    kv = KVCacheManager(3, BS, enable_prefix_caching=False)
    big = make_request("big", list(range(13)))  # needs 4 blocks
    assert not kv.allocate(big, 13)
    assert "big" not in kv.block_tables
    assert kv.num_free_blocks == 3
    small = make_request("small", list(range(12)))
    assert kv.allocate(small, 12)
    assert kv.num_free_blocks == 0


def test_slots_follow_the_block_table():
    kv = KVCacheManager(8, BS, enable_prefix_caching=False)
    r = make_request("a", list(range(6)))
    admit(kv, r)
    table = kv.block_tables["a"]
    assert [kv.slot("a", p) for p in range(6)] == [table[p // BS] * BS + p % BS for p in range(6)]


def test_prefix_hit_shares_blocks_and_counts_references():
    kv = KVCacheManager(16, BS)
    shared = list(range(100, 108))  # two full blocks
    a = make_request("a", shared + [1, 2, 3])
    b = make_request("b", shared + [7, 8])
    assert admit(kv, a) == 0
    assert admit(kv, b) == 8  # both full blocks found
    ta, tb = kv.block_tables["a"], kv.block_tables["b"]
    assert tb[:2] == ta[:2] and tb[2] != ta[2]
    assert [kv.pool.ref_counts[x] for x in ta[:2]] == [2, 2]
    assert kv.pool.ref_counts[ta[2]] == 1
    assert kv.stats.hit_tokens == 8
    assert kv.stats.queried_tokens == a.num_prompt_tokens + b.num_prompt_tokens
    assert kv.stats.hit_rate == pytest.approx(8 / 21)
    kv.free(a)
    assert [kv.pool.ref_counts[x] for x in tb[:2]] == [1, 1]
    kv.free(b)
    assert_all_free(kv)


def test_prefix_hit_survives_the_owner_and_keeps_free_count_right():
    kv = KVCacheManager(6, BS)
    tokens = list(range(50, 62))  # three full blocks
    a = make_request("a", tokens + [1])
    admit(kv, a)
    kv.free(a)
    assert kv.num_free_blocks == 6  # cached blocks are free to evict, but still findable
    b = make_request("b", tokens + [2])
    assert admit(kv, b) == 12
    assert kv.num_free_blocks == 2  # three reused from the free list + one new
    kv.free(b)
    assert_all_free(kv)


def test_full_prompt_hit_leaves_a_token_to_compute():
    kv = KVCacheManager(16, BS)
    tokens = list(range(8))  # exactly two full blocks
    admit(kv, make_request("a", tokens))
    same = make_request("b", tokens)
    cached = kv.find_cached_prefix(same)
    assert len(cached) == 1  # the last block is recomputed so a token is left to sample from
    longer = make_request("c", tokens + [9])
    assert len(kv.find_cached_prefix(longer)) == 2


def test_prefix_lookup_stops_at_first_miss_and_respects_parent_hash():
    kv = KVCacheManager(16, BS)
    admit(kv, make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 0]))
    # second block's tokens equal, first differs: the chained hash must not match
    other = make_request("b", [9, 9, 9, 9, 5, 6, 7, 8, 0])
    assert kv.find_cached_prefix(other) == []
    assert hash_block(None, [5, 6, 7, 8]) != hash_block(hash_block(None, [1, 2, 3, 4]), [5, 6, 7, 8])


def test_only_recorded_lookups_count_in_the_hit_rate():
    kv = KVCacheManager(16, BS)
    admit(kv, make_request("a", list(range(9))))
    b = make_request("b", list(range(9)))
    for _ in range(3):  # a request retried while it waits for blocks looks up again and again
        kv.find_cached_prefix(b)
    assert (kv.stats.queried_tokens, kv.stats.hit_tokens) == (9, 0)
    admit(kv, b)
    assert (kv.stats.queried_tokens, kv.stats.hit_tokens) == (18, 8)
    off = KVCacheManager(16, BS, enable_prefix_caching=False)
    admit(off, make_request("a", list(range(9))))
    assert off.stats.queried_tokens == 0 and off.stats.hit_rate == 0.0


def test_prefix_caching_off_and_prompt_logprobs_bypass_the_cache():
    kv = KVCacheManager(16, BS, enable_prefix_caching=False)
    admit(kv, make_request("a", list(range(9))))
    assert kv.find_cached_prefix(make_request("b", list(range(9)))) == []
    kv2 = KVCacheManager(16, BS)
    admit(kv2, make_request("a", list(range(9))))
    r = Request("c", list(range(9)), SamplingParams(prompt_logprobs=1), 16, [])
    assert kv2.find_cached_prefix(r) == []


def test_unreferenced_cached_blocks_are_evicted_lru():
    kv = KVCacheManager(4, BS)
    a = make_request("a", list(range(0, 8)) + [99])  # 3 blocks, 2 full
    admit(kv, a)
    kv.free(a)
    b = make_request("b", list(range(20, 24)) + [98])  # 2 blocks, 1 full
    # b reuses the one never-used block first, then the least recently freed: a's partial tail block
    admit(kv, b)
    probe = make_request("p", list(range(0, 8)) + [97])
    assert len(kv.find_cached_prefix(probe)) == 2  # a's full blocks survive
    kv.free(b)
    # a new request needing three blocks evicts a's blocks (freed before b's) and keeps b's full block
    c = make_request("c", list(range(40, 52)))
    admit(kv, c)
    assert kv.find_cached_prefix(make_request("p2", list(range(0, 8)) + [97])) == []
    assert len(kv.find_cached_prefix(make_request("p3", list(range(20, 24)) + [1]))) == 1
    kv.free(c)
    assert_all_free(kv)


def test_referenced_blocks_are_never_evicted():
    kv = KVCacheManager(4, BS)
    a = make_request("a", list(range(8)))  # 2 blocks, both held
    admit(kv, a)
    b = make_request("b", list(range(20, 32)))  # 3 blocks: only 2 are free
    assert not kv.allocate(b, 12)
    assert kv.block_tables["a"] and all(kv.pool.ref_counts[x] == 1 for x in kv.block_tables["a"])


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    kv = KVCacheManager(16, BS)
    parent = make_request("p", list(range(10)))  # 2 full blocks + 2 tokens
    admit(kv, parent)
    child = make_request("c", list(range(10)))
    child.num_computed_tokens = parent.num_computed_tokens
    copy = kv.fork(parent, child)
    tp, tc = kv.block_tables["p"], kv.block_tables["c"]
    assert tc[:2] == tp[:2]
    assert [kv.pool.ref_counts[x] for x in tp[:2]] == [2, 2]
    assert copy == (tp[2], tc[2]) and tc[2] != tp[2]
    assert kv.pool.ref_counts[tp[2]] == 1 and kv.pool.ref_counts[tc[2]] == 1
    # the branches write their own tokens into their own partial blocks
    decode(kv, parent, 1)
    decode(kv, child, 2)
    assert kv.block_tables["p"][2] != kv.block_tables["c"][2]
    kv.free(parent)
    kv.free(child)
    assert_all_free(kv)


def test_fork_at_a_block_boundary_copies_nothing():
    kv = KVCacheManager(16, BS)
    parent = make_request("p", list(range(8)))
    admit(kv, parent)
    child = make_request("c", list(range(8)))
    child.num_computed_tokens = 8
    assert kv.fork(parent, child) is None
    assert kv.block_tables["c"] == kv.block_tables["p"]
    decode(kv, child, 5)  # the child's next token opens a block of its own
    assert kv.block_tables["c"][2] not in kv.block_tables["p"]
    kv.free(parent)
    kv.free(child)
    assert_all_free(kv)


def test_swap_out_and_in_bookkeeping():
    kv = KVCacheManager(8, BS, enable_prefix_caching=False, num_swap_blocks=4)
    r = make_request("a", list(range(10)))  # 3 blocks
    admit(kv, r)
    table = list(kv.block_tables["a"])
    assert kv.can_swap_out(r)
    out = kv.swap_out(r)
    assert [d for d, _ in out] == table
    swap = [s for _, s in out]
    assert len(set(swap)) == 3 and all(0 <= s < 4 for s in swap)
    assert "a" not in kv.block_tables and kv.swap_tables["a"] == swap
    assert kv.num_free_blocks == 8
    assert len(kv.free_swap_blocks) == 1
    # another request takes most device blocks: not enough room to swap back in
    hog = make_request("hog", list(range(100, 124)))  # 6 blocks: 2 left
    admit(kv, hog)
    assert kv.num_free_blocks == 2
    assert kv.swap_in(r) is None
    assert kv.swap_tables["a"] == swap
    kv.free(hog)
    back = kv.swap_in(r)
    assert [s for s, _ in back] == swap
    assert kv.block_tables["a"] == [d for _, d in back]
    assert "a" not in kv.swap_tables and len(kv.free_swap_blocks) == 4
    decode(kv, r, 7)  # the swapped-in request keeps growing
    kv.free(r)
    assert_all_free(kv)
    assert sorted(kv.free_swap_blocks) == [0, 1, 2, 3]


def test_swap_space_limit():
    kv = KVCacheManager(8, BS, enable_prefix_caching=False, num_swap_blocks=2)
    r = make_request("a", list(range(10)))  # 3 blocks > 2 swap blocks
    admit(kv, r)
    assert not kv.can_swap_out(r)


def test_free_of_a_swapped_request_returns_its_swap_blocks():
    kv = KVCacheManager(8, BS, num_swap_blocks=4)
    r = make_request("a", list(range(6)))
    admit(kv, r)
    kv.swap_out(r)
    kv.free(r)
    assert_all_free(kv)
    assert len(kv.free_swap_blocks) == 4


def test_every_block_is_free_after_a_random_workload():
    rng = random.Random(0)
    kv = KVCacheManager(64, BS, num_swap_blocks=16)
    prefixes = [[rng.randrange(1000) for _ in range(rng.choice([4, 8, 12]))] for _ in range(3)]
    live: list[Request] = []
    for i in range(200):
        action = rng.random()
        if action < 0.4 or not live:
            r = make_request(f"r{i}", rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(1, 9))])
            cached = kv.find_cached_prefix(r)
            if kv.allocate(r, r.num_tokens - len(cached) * BS, cached):
                r.num_computed_tokens = r.num_tokens
                live.append(r)
        elif action < 0.6:
            r = rng.choice(live)
            if r.request_id in kv.block_tables and kv.num_free_blocks > 0:
                child = make_request(f"{r.request_id}.c{i}", r.prompt_token_ids)
                child.output_token_ids = list(r.output_token_ids)
                child.num_computed_tokens = r.num_computed_tokens
                kv.fork(r, child)
                live.append(child)
        elif action < 0.8:
            r = rng.choice(live)
            if r.request_id in kv.block_tables:
                r.output_token_ids.append(rng.randrange(1000))
                if kv.allocate(r, 1):
                    r.num_computed_tokens += 1
                else:
                    r.output_token_ids.pop()
        elif action < 0.9:
            r = rng.choice(live)
            if r.request_id in kv.block_tables and kv.can_swap_out(r):
                kv.swap_out(r)
            elif r.request_id in kv.swap_tables:
                kv.swap_in(r)
        else:
            kv.free(live.pop(rng.randrange(len(live))))
        # invariant: a block's reference count is the number of tables holding it
        held = [0] * kv.num_blocks
        for table in kv.block_tables.values():
            for b in table:
                held[b] += 1
        assert held == kv.pool.ref_counts
        assert kv.num_free_blocks == sum(1 for c in held if c == 0)
    for r in live:
        kv.free(r)
    assert_all_free(kv)
    assert len(kv.free_swap_blocks) == 16
