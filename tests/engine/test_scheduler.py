"""Scheduler driven by a fake runner: budgets, order, chunked prefill, preemption (recompute and swap), forks.

The fake runner stands in for the model: it keeps one token id per KV slot, writes each scheduled token
at the slot its block table gives, reads every context back through the block tables (so a wrong table,
a missed copy or a lost swap shows as corrupted context), and "samples" a token that is a deterministic
function of that context. Output must therefore match a plain reference loop, however it was scheduled.
"""

from __future__ import annotations

import random

import pytest

from roofline.config import SchedulerConfig
from roofline.engine.kv_cache import KVCacheManager
from roofline.engine.request import Request, RequestStatus
from roofline.engine.scheduler import Scheduler, SchedulerOutput
from roofline.sampling_params import SamplingParams

BS = 4
VOCAB = 1000


def next_token(context: list[int], sample_index: int) -> int:
    """The fake model: a deterministic function of the context (and of which sample this is)."""
    return (sum((i + 1) * t for i, t in enumerate(context)) * 31 + 17 * sample_index) % VOCAB


def reference(prompt: list[int], max_tokens: int, sample_index: int = 0) -> list[int]:
    """What any correct schedule must produce."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens, sample_index))
    return tokens[len(prompt):]


class FakeRunner:
    """Token ids in place of K/V tensors; block copies and swaps applied as the real runner orders them.

    Like the real runner it sees only the scheduler's hand-off (new requests, appended block ids, forks,
    finished and preempted ids) and keeps its own block tables and token lists: a hand-off that leaves
    anything out shows as corrupted context or a missing request.
    """

    def __init__(self, kv: KVCacheManager, num_swap_blocks: int = 0) -> None:
        self.kv = kv
        self.cache: list[int | None] = [None] * (kv.num_blocks * kv.block_size)
        self.swap: list[int | None] = [None] * (num_swap_blocks * kv.block_size)
        self.tables: dict[str, list[int]] = {}
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}

    def _copy_block(self, src: list, s: int, dst: list, d: int) -> None:
        bs = self.kv.block_size
        dst[d * bs:(d + 1) * bs] = src[s * bs:(s + 1) * bs]

    def _slot(self, rid: str, position: int) -> int:
        bs = self.kv.block_size
        return self.tables[rid][position // bs] * bs + position % bs

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        for rid in out.finished_ids + out.preempted_ids:
            for held in (self.tables, self.tokens, self.computed):
                held.pop(rid, None)
        for new in out.new_requests:
            self.tables[new.request_id] = list(new.block_ids)
            self.tokens[new.request_id] = list(new.token_ids)
            self.computed[new.request_id] = new.num_computed_tokens
        for cached in out.cached_requests:
            self.tables[cached.request_id].extend(cached.new_block_ids)
            assert self.computed[cached.request_id] == cached.num_computed_tokens
        assert set(out.num_scheduled_tokens) <= set(self.tables), "a scheduled request was never handed over"
        for s, d in out.block_copies:
            self._copy_block(self.cache, s, self.cache, d)
        for d, s in out.swap_out:
            self._copy_block(self.cache, d, self.swap, s)
        for s, d in out.swap_in:
            self._copy_block(self.swap, s, self.cache, d)
        # every new token is written before any context is read, as attention does in each layer
        for rid, n in out.num_scheduled_tokens.items():
            start = self.computed[rid]
            for p in range(start, start + n):
                self.cache[self._slot(rid, p)] = self.tokens[rid][p]
        sampled = {}
        for rid, n in out.num_scheduled_tokens.items():
            end = self.computed[rid] + n
            context = [self.cache[self._slot(rid, p)] for p in range(end)]
            assert context == self.tokens[rid][:end], f"KV of {rid} corrupted"
            self.computed[rid] = end
            if end == len(self.tokens[rid]):
                sampled[rid] = next_token(context, int(rid.rpartition("#")[2] or 0) if "#" in rid else 0)
                for fork in out.forks.get(rid, []):
                    sampled[fork.request_id] = next_token(context, int(fork.request_id.rpartition("#")[2]))
                    self.tables[fork.request_id] = []
                    self.tokens[fork.request_id] = context + [sampled[fork.request_id]]
                    self.computed[fork.request_id] = end
                self.tokens[rid].append(sampled[rid])
        return sampled


def make_scheduler(num_blocks: int = 64, max_num_seqs: int = 8, max_num_batched_tokens: int = 64,
                   num_swap_blocks: int = 0, policy=None, prefix_caching: bool = True):
    kv = KVCacheManager(num_blocks, BS, prefix_caching, num_swap_blocks)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
    sched = Scheduler(config, kv, policy) if policy else Scheduler(config, kv)
    return sched, FakeRunner(kv, num_swap_blocks)


def make_request(rid: str, prompt: list[int], max_tokens: int, priority: int = 0, arrival: float = 0.0,
                 sample_index: int = 0, parent_id: str | None = None) -> Request:
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens), max_tokens, [], priority=priority,
                   arrival_time=arrival, sample_index=sample_index, parent_id=parent_id)


def prompt_of(length: int, seed: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % VOCAB for i in range(length)]


def step(sched: Scheduler, runner: FakeRunner) -> SchedulerOutput:
    """One engine step: schedule, run, update, finish what reached max_tokens."""
    out = sched.schedule()
    sampled = runner.execute(out)
    sched.update_from_output(out, sampled)
    for item in out.scheduled:
        for r in [item.request, *item.fork_children]:
            if r.request_id in sampled and r.num_output_tokens >= r.max_tokens:
                sched.finish(r, RequestStatus.FINISHED_LENGTH)
    return out


def run_all(sched: Scheduler, runner: FakeRunner, max_steps: int = 2000) -> list[SchedulerOutput]:
    outs = []
    while sched.num_unfinished:
        outs.append(step(sched, runner))
        assert len(outs) < max_steps, "the scheduler made no progress"
    return outs


def assert_idle(sched: Scheduler) -> None:
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    assert not sched.kv.block_tables and not sched.kv.swap_tables


def test_budget_and_max_num_seqs_are_respected():
    sched, runner = make_scheduler(max_num_seqs=4, max_num_batched_tokens=32)
    requests = [make_request(f"r{i}", prompt_of(5 + 9 * i, i), 4 + i % 5, arrival=i) for i in range(12)]
    for r in requests:
        sched.add_request(r)
    outs = run_all(sched, runner)
    for out in outs:
        assert out.num_batched_tokens <= 32
        assert len(out.scheduled) <= 4
        assert all(s.num_new_tokens >= 1 for s in out.scheduled)
    assert max(o.num_batched_tokens for o in outs) == 32  # long prompts fill the budget
    for r in requests:
        assert r.output_token_ids == reference(r.prompt_token_ids, r.max_tokens)
        assert r.status == RequestStatus.FINISHED_LENGTH
    assert_idle(sched)


def test_running_requests_are_scheduled_before_waiting_ones():
    sched, runner = make_scheduler(max_num_batched_tokens=3)
    decoders = [make_request(f"d{i}", prompt_of(2, i), 50, arrival=i) for i in range(3)]
    for r in decoders:
        sched.add_request(r)
    step(sched, runner)  # three 2-token prompts would need 6 tokens: only the first fits
    step(sched, runner)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in decoders):
        step(sched, runner)
    late = make_request("late", prompt_of(20, 9), 5, priority=-1, arrival=10)  # even a higher priority waits
    sched.add_request(late)
    for _ in range(3):
        out = step(sched, runner)
        assert [s.request.request_id for s in out.scheduled] == ["d0", "d1", "d2"]
        assert all(s.num_new_tokens == 1 for s in out.scheduled)
    assert late.num_computed_tokens == 0 and late.status == RequestStatus.WAITING
    sched.config.max_num_batched_tokens = 8
    out = step(sched, runner)
    assert [s.request.request_id for s in out.scheduled] == ["d0", "d1", "d2", "late"]
    assert out.scheduled[-1].num_new_tokens == 5


def test_waiting_requests_start_in_priority_then_arrival_order():
    sched, runner = make_scheduler(max_num_seqs=1)
    specs = [("low", 2, 0.0), ("first", 0, 1.0), ("mid", 1, 2.0), ("second", 0, 3.0)]
    for rid, priority, arrival in specs:
        sched.add_request(make_request(rid, prompt_of(3, len(rid)), 2, priority=priority, arrival=arrival))
    started = []
    for out in run_all(sched, runner):
        for s in out.scheduled:
            if s.request.request_id not in started:
                started.append(s.request.request_id)
    assert started == ["first", "second", "mid", "low"]


def test_long_prompt_is_chunked_while_others_decode():
    sched, runner = make_scheduler(max_num_batched_tokens=16)
    decoders = [make_request(f"d{i}", prompt_of(3, i), 40, arrival=i) for i in range(2)]
    for r in decoders:
        sched.add_request(r)
    step(sched, runner)
    assert all(r.num_output_tokens == 1 for r in decoders)
    long = make_request("long", prompt_of(100, 5), 3, arrival=5)
    sched.add_request(long)
    num_chunks = 0
    while long.num_computed_tokens < long.num_prompt_tokens:
        before = [r.num_output_tokens for r in decoders]
        out = step(sched, runner)
        by_id = {s.request.request_id: s.num_new_tokens for s in out.scheduled}
        assert by_id["d0"] == by_id["d1"] == 1  # decodes never stall behind the prompt
        assert by_id["long"] == min(14, 100 - 14 * num_chunks)
        assert [r.num_output_tokens for r in decoders] == [b + 1 for b in before]
        num_chunks += 1
        if long.num_computed_tokens < long.num_prompt_tokens:
            assert long.num_output_tokens == 0  # no token is sampled from a partial prompt
    assert num_chunks == 8  # ceil(100 / 14)
    assert long.num_output_tokens == 1
    run_all(sched, runner)
    for r in [*decoders, long]:
        assert r.output_token_ids == reference(r.prompt_token_ids, r.max_tokens)
    assert_idle(sched)


def _preemption_workload(sched: Scheduler) -> list[Request]:
    requests = [make_request(f"r{i}", prompt_of(6 + i, i), 14, arrival=i) for i in range(5)]
    for r in requests:
        sched.add_request(r)
    return requests


def test_recompute_preemption_frees_blocks_and_loses_nothing():
    sched, runner = make_scheduler(num_blocks=12, max_num_batched_tokens=64)  # 48 token slots for ~100 tokens
    requests = _preemption_workload(sched)
    saw_preemption = False
    while sched.num_unfinished:
        out = step(sched, runner)
        for rid in out.preempted_ids:
            saw_preemption = True
            victim = next(r for r in requests if r.request_id == rid)
            assert victim.num_computed_tokens == 0 and victim in sched.waiting
            assert rid not in sched.kv.block_tables
            assert rid not in [s.request.request_id for s in out.scheduled]
    assert saw_preemption and sched.num_preemptions > 0 and sched.num_swaps == 0
    for r in requests:
        assert r.output_token_ids == reference(r.prompt_token_ids, 14)
    assert_idle(sched)


def test_swap_preemption_keeps_progress_and_loses_nothing():
    sched, runner = make_scheduler(num_blocks=12, num_swap_blocks=32, policy=lambda r: "swap")
    requests = _preemption_workload(sched)
    saw_swap_in = False
    while sched.num_unfinished:
        progress = {r.request_id: r.num_computed_tokens for r in requests}
        out = step(sched, runner)
        saw_swap_in |= bool(out.swap_in)
        for rid in out.preempted_ids:
            victim = next(r for r in requests if r.request_id == rid)
            assert victim.is_swapped and victim.num_computed_tokens == progress[rid]
            assert rid in sched.kv.swap_tables
    assert sched.num_swaps > 0 and sched.num_swaps == sched.num_preemptions and saw_swap_in
    for r in requests:
        assert r.output_token_ids == reference(r.prompt_token_ids, 14)
    assert_idle(sched)
    assert len(sched.kv.free_swap_blocks) == 32


def test_swap_without_room_falls_back_to_recompute():
    sched, runner = make_scheduler(num_blocks=12, num_swap_blocks=1, policy=lambda r: "swap")
    requests = _preemption_workload(sched)
    run_all(sched, runner)
    assert sched.num_preemptions > sched.num_swaps
    for r in requests:
        assert r.output_token_ids == reference(r.prompt_token_ids, 14)
    assert_idle(sched)


def test_lowest_priority_running_request_is_preempted_first():
    sched, runner = make_scheduler(num_blocks=8, max_num_batched_tokens=64)
    important = make_request("important", prompt_of(7, 1), 20, priority=0, arrival=5)
    casual = make_request("casual", prompt_of(7, 2), 20, priority=3, arrival=0)
    sched.add_request(casual)
    sched.add_request(important)
    preempted = []
    while sched.num_unfinished:
        preempted += step(sched, runner).preempted_ids
    assert preempted and set(preempted) == {"casual"}
    assert important.output_token_ids == reference(important.prompt_token_ids, 20)
    assert casual.output_token_ids == reference(casual.prompt_token_ids, 20)


def _parent_with_children(n: int, prompt_len: int, max_tokens: int) -> tuple[Request, list[Request]]:
    prompt = prompt_of(prompt_len, 3)
    parent = make_request("g#0", prompt, max_tokens)
    children = [make_request(f"g#{i}", prompt, max_tokens, sample_index=i, parent_id="g") for i in range(1, n)]
    return parent, children


def test_forked_children_share_the_prompt_copy_on_write():
    sched, runner = make_scheduler()
    parent, children = _parent_with_children(3, 10, 6)  # 2 full blocks + 2 tokens
    sched.add_request(parent)
    sched.add_children(parent, children)
    out = step(sched, runner)
    assert [c.request_id for c in out.scheduled[0].fork_children] == ["g#1", "g#2"]
    assert all(c.status == RequestStatus.RUNNING and c in sched.running for c in children)
    assert all(len(x.output_token_ids) == 1 for x in [parent, *children])
    tables = [sched.kv.block_tables[x.request_id] for x in [parent, *children]]
    assert tables[1][:2] == tables[2][:2] == tables[0][:2]
    assert [sched.kv.pool.ref_counts[b] for b in tables[0][:2]] == [3, 3]
    assert len({t[2] for t in tables}) == 3  # each sample has its own copy of the partial block
    out = step(sched, runner)
    assert sorted(out.block_copies) == sorted((tables[0][2], t[2]) for t in tables[1:])
    run_all(sched, runner)
    outputs = [x.output_token_ids for x in [parent, *children]]
    assert outputs == [reference(parent.prompt_token_ids, 6, i) for i in range(3)]
    assert len({tuple(o) for o in outputs}) == 3
    assert_idle(sched)


def test_children_run_as_ordinary_requests_when_there_is_no_room_to_fork():
    sched, runner = make_scheduler(max_num_seqs=1)
    parent, children = _parent_with_children(3, 9, 4)
    sched.add_request(parent)
    sched.add_children(parent, children)
    out = step(sched, runner)
    assert out.scheduled[0].fork_children == []
    assert all(c in sched.waiting for c in children)
    run_all(sched, runner)
    assert [x.output_token_ids for x in [parent, *children]] == [reference(parent.prompt_token_ids, 4, i)
                                                                  for i in range(3)]
    assert sched.kv.stats.hit_tokens > 0  # the children found the parent's prompt in the prefix cache
    assert_idle(sched)


def test_forks_survive_preemption():
    sched, runner = make_scheduler(num_blocks=10, num_swap_blocks=16, policy=lambda r: "swap")
    parent, children = _parent_with_children(4, 9, 12)
    sched.add_request(parent)
    sched.add_children(parent, children)
    other = make_request("other", prompt_of(8, 7), 12, arrival=1)
    sched.add_request(other)
    run_all(sched, runner)
    assert sched.num_preemptions > 0
    assert [x.output_token_ids for x in [parent, *children]] == [reference(parent.prompt_token_ids, 12, i)
                                                                  for i in range(4)]
    assert other.output_token_ids == reference(other.prompt_token_ids, 12)
    assert_idle(sched)


def test_finish_frees_blocks_at_once_and_requeues_unforked_children():
    sched, runner = make_scheduler(max_num_batched_tokens=4)
    parent, children = _parent_with_children(2, 12, 4)
    sched.add_request(parent)
    sched.add_children(parent, children)
    step(sched, runner)  # first chunk of the prompt: children not forked yet
    assert sched.kv.num_free_blocks < sched.kv.num_blocks
    sched.finish(parent, RequestStatus.FINISHED_ABORTED)
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    assert children[0] in sched.waiting and children[0].parent_id is None
    run_all(sched, runner)
    assert children[0].output_token_ids == reference(parent.prompt_token_ids, 4, 1)
    assert_idle(sched)


def test_prefix_cache_statistics_count_each_admission_once():
    sched, runner = make_scheduler(num_blocks=6, max_num_batched_tokens=64)
    hog = make_request("hog", prompt_of(16, 1), 8)  # 4 blocks, growing to 6
    blocked = make_request("blocked", prompt_of(10, 2), 2, arrival=1)  # 3 blocks: waits for the hog to finish
    sched.add_request(hog)
    sched.add_request(blocked)
    steps = run_all(sched, runner)
    assert len(steps) > 5  # the blocked request was looked at on many steps
    assert sched.kv.stats.queried_tokens == 16 + 10
    assert sched.kv.stats.hit_tokens == 0


def test_prefix_hit_rate_stays_a_share_after_recompute():
    sched, runner = make_scheduler(num_blocks=12, max_num_batched_tokens=64)
    requests = _preemption_workload(sched)
    run_all(sched, runner)
    assert sched.num_preemptions > 0
    stats = sched.kv.stats
    assert 0 < stats.hit_tokens <= stats.queried_tokens  # resumed requests found their own blocks
    assert stats.queried_tokens <= sum(r.num_tokens for r in requests) * (1 + sched.num_preemptions)


def run_watched(sched: Scheduler, runner: FakeRunner, requests: list[Request]) -> int:
    """Run to the end under a watchdog: every step advances some request, waiting requests hold no device
    blocks, and the run ends within the serial bound (the first running request advances every step)."""
    bound = sum(r.num_prompt_tokens + r.max_tokens for r in requests)
    steps = 0
    while sched.num_unfinished:
        out = step(sched, runner)
        steps += 1
        assert out.num_batched_tokens > 0, f"step {steps}: work waits but nothing was scheduled"
        for r in sched.waiting:
            assert r.request_id not in sched.kv.block_tables, f"waiting {r.request_id} holds device blocks"
        assert steps <= bound, "the scheduler made no progress"
    return steps


@pytest.mark.parametrize("policy", ["swap", "recompute"])
def test_a_group_of_samples_larger_than_the_cache_never_wedges(policy):
    # issue 17 F1, scaled down: each sample (19 + 40 tokens = 15 blocks) fits the 16-block cache alone,
    # the four together never do. Before: swapped-in samples held blocks while waiting, and all stopped.
    sched, runner = make_scheduler(num_blocks=16, num_swap_blocks=16, policy=lambda r: policy)
    parent, children = _parent_with_children(4, 19, 40)
    sched.add_request(parent)
    sched.add_children(parent, children)
    run_watched(sched, runner, [parent, *children])
    assert sched.num_preemptions > 0
    assert [x.output_token_ids for x in [parent, *children]] == [reference(parent.prompt_token_ids, 40, i)
                                                                  for i in range(4)]
    assert_idle(sched)


def test_no_schedule_stalls_over_random_workloads():
    # seeded random workloads at the edge of the cache: groups, stragglers, priorities, both policies
    rng = random.Random(17)
    for trial in range(120):
        num_blocks = rng.randint(6, 24)
        policy = rng.choice(["swap", "recompute"])
        sched, runner = make_scheduler(num_blocks=num_blocks, num_swap_blocks=rng.choice([1, num_blocks]),
                                       policy=lambda r, p=policy: p, max_num_seqs=rng.randint(1, 6),
                                       max_num_batched_tokens=rng.choice([4, 16, 64]))
        requests = []
        for g in range(rng.randint(1, 3)):
            total = rng.randint(4, num_blocks * BS)  # any single sequence fits the cache, as the engine ensures
            prompt_len = rng.randint(1, total - 1)
            n = rng.randint(1, 4)
            prompt = prompt_of(prompt_len, trial * 10 + g)
            group = [make_request(f"t{g}#{i}", prompt, total - prompt_len, priority=rng.randint(0, 1),
                                  arrival=g, sample_index=i, parent_id=f"t{g}" if i else None) for i in range(n)]
            for c in group[1:]:
                c.priority = group[0].priority
            sched.add_request(group[0])
            if n > 1:
                sched.add_children(group[0], group[1:])
            requests += group
        run_watched(sched, runner, requests)
        for r in requests:
            assert r.output_token_ids == reference(r.prompt_token_ids, r.max_tokens, r.sample_index), trial
        assert_idle(sched)


def test_a_long_prompt_never_stops_a_stream_and_a_short_prompt_is_not_queued_behind_it():
    # issue 17 F2: the long prompt arrives first and would take every step's whole budget
    sched, runner = make_scheduler(num_blocks=128, max_num_batched_tokens=32)
    sched.prefill_chunk_limit = 8  # what the engine would derive from max_decode_stall_ms
    long = make_request("long", prompt_of(300, 1), 4, arrival=0)
    sched.add_request(long)
    out = step(sched, runner)
    assert out.num_scheduled_tokens == {"long": 32}  # alone: the whole budget
    short = make_request("short", prompt_of(5, 2), 60, arrival=1)
    sched.add_request(short)
    out = step(sched, runner)
    assert out.num_scheduled_tokens == {"long": 16, "short": 5}  # the long prompt left half to the newcomer
    assert short.num_output_tokens == 1
    while long.num_computed_tokens < long.num_prompt_tokens:
        before = short.num_output_tokens
        out = step(sched, runner)
        assert short.num_output_tokens == before + 1, "the stream stalled behind the long prompt"
        assert out.num_scheduled_tokens["long"] <= 8  # while a sequence decodes, chunks stay short
    run_all(sched, runner)
    for r in (long, short):
        assert r.output_token_ids == reference(r.prompt_token_ids, r.max_tokens)
    assert_idle(sched)


def test_prompt_chunks_leave_a_token_for_every_decode_behind_them():
    sched, runner = make_scheduler(num_blocks=128, max_num_seqs=8, max_num_batched_tokens=6)
    long = make_request("long", prompt_of(60, 1), 2, arrival=0)
    decoders = [make_request(f"d{i}", prompt_of(1, 10 + i), 20, arrival=1 + i) for i in range(4)]
    for r in [long, *decoders]:
        sched.add_request(r)
    while any(d.num_output_tokens == 0 for d in decoders):
        step(sched, runner)
    assert long.num_computed_tokens < 30  # the decoders started long before the prompt was done
    while long.num_computed_tokens < long.num_prompt_tokens:
        out = step(sched, runner)
        assert all(out.num_scheduled_tokens.get(d.request_id) == 1 for d in decoders if not d.status.is_finished)
        assert out.num_scheduled_tokens["long"] >= 1  # the first request still advances every step
    run_all(sched, runner)
    assert_idle(sched)
