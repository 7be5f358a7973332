"""Scheduler: decides, each step, which requests run and how many tokens each (continuous batching).

Running requests go first (one decode token each, or the next chunk of an unfinished prompt), then
waiting requests in the policy's order, all within `max_num_batched_tokens` and `max_num_seqs`.
Long prompts are split into chunks so decodes never stall behind them. When KV blocks run out, the
lowest-priority running request is preempted: its blocks are swapped to CPU memory or freed for
recomputation, whichever the cost estimate says is cheaper.

Policies (`SchedulerConfig.scheduling`): "fifo" runs in arrival order; "priority" in (priority,
arrival) order; "slo" (the default) orders waiting requests by priority, then the tenant's fair
share, then TTFT deadline, and uses the step-time model to admit a request only while running
requests keep their TPOT targets, to cut prompt chunks to the tightest TPOT budget, and to preempt a
lower class when a higher one would otherwise miss its TTFT (docs/scheduling.md).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from roofline.config import SchedulerConfig
from roofline.engine.fair_share import TenantShares
from roofline.engine.kv_cache import KVCacheManager
from roofline.engine.request import Request, RequestStatus
from roofline.engine.step_model import StepShape, StepTimeModel
from roofline.sampling_params import SamplingParams

logger = logging.getLogger("roofline")
MIN_PREFILL_CHUNK = 16  # prompt tokens a step takes at least while a TPOT budget cuts chunks, so prompts advance
# slo: steps are planned to this share of the tightest TPOT target, headroom for the model's error and noise
TPOT_MARGIN = 0.85
# slo: a request without targets joins running ones with targets only while a decode step stays within this
# share of the tightest, so the next request with a target still fits without preempting anything
BULK_TPOT_SHARE = 0.7


@dataclass
class ScheduledRequest:
    """One request's share of a step."""

    request: Request
    num_new_tokens: int  # tokens to compute this step, from request.num_computed_tokens on
    fork_children: list[Request] = field(default_factory=list)  # n > 1: samples that branch off this prompt

    @property
    def completes_sequence(self) -> bool:
        """True when this step computes the last known token, so a new token is sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class NewRequestData:
    """A request the runner does not hold yet (first run, or resumed after a preemption): all it needs."""

    request_id: str
    token_ids: list[int]  # the prompt, plus tokens generated before a preemption
    num_prompt_tokens: int
    sampling_params: SamplingParams
    generator: torch.Generator | None
    block_ids: list[int]  # the whole block table
    num_computed_tokens: int  # tokens whose K/V are already cached (prefix hit, swap-in)
    num_prompt_logprobs_done: int  # prompt positions whose logprobs were reported before a preemption


@dataclass
class CachedRequestData:
    """A request the runner already holds: only what changed since its last step."""

    request_id: str
    new_block_ids: list[int]  # blocks appended to its table
    num_computed_tokens: int


@dataclass
class ForkedSample:
    """One of samples 2..n that branches off its parent's prompt in the step that completes it."""

    request_id: str
    sampling_params: SamplingParams
    generator: torch.Generator | None


@dataclass
class SchedulerOutput:
    """The plan of one step.

    The model runner reads only the hand-off fields (new and cached requests, token counts, forks,
    finished ids and block moves) and keeps its own state; `scheduled` is the scheduler's own view.
    """

    scheduled: list[ScheduledRequest]
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)  # request id -> tokens, in batch order
    forks: dict[str, list[ForkedSample]] = field(default_factory=dict)  # parent id -> samples forking off it
    finished_ids: list[str] = field(default_factory=list)  # finished since the last step: state to drop
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) device blocks (forks)
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, swap block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (swap block, device block)
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        """Tokens computed this step."""
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        """True when nothing is to be computed (block moves may still be pending)."""
        return not self.scheduled


# request -> "swap" or "recompute"
PreemptionPolicy = Callable[[Request], str]


def recompute_always(request: Request) -> str:
    """The preemption policy that never swaps."""
    return "recompute"


def run_order(request: Request) -> tuple:
    """Who runs first: priority, then arrival, then sample index and id, a total order.

    Total, so the first running request stays first until it finishes (unless a more urgent one
    arrives): it is never the one preempted while another runs, and since any single sequence fits
    the cache (the engine caps max_model_len by it), it advances every step. No schedule can stall.
    """
    return request.priority, request.arrival_time, request.sample_index, request.request_id


def fifo_order(request: Request) -> tuple:
    """Arrival order, a total order (the "fifo" policy)."""
    return request.arrival_time, request.sample_index, request.request_id


def slo_class(request: Request) -> tuple[int, bool]:
    """A request's class in "slo" mode: its priority, and requests with a latency target before those without."""
    return request.priority, request.sampling_params.slo is None


def slo_run_order(request: Request) -> tuple:
    """Running order in "slo" mode: class, then arrival (static, so the progress argument of run_order holds)."""
    return *slo_class(request), request.arrival_time, request.sample_index, request.request_id


class Scheduler:
    """Iteration-level scheduler over a waiting queue and a running set."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager,
                 preemption_policy: PreemptionPolicy = recompute_always, step_model: StepTimeModel | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`step_model` predicts step times for the "slo" policy (without one it orders and shares only)."""
        self.config = config
        self.kv = kv
        self.preemption_policy = preemption_policy
        self.step_model = step_model
        self.clock = clock
        self.shares = TenantShares(config.tenant_weights)
        self.is_slo = config.scheduling == "slo"
        self._running_order = {"fifo": fifo_order, "priority": run_order, "slo": slo_run_order}[config.scheduling]
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.pending_children: dict[str, list[Request]] = {}
        self._pending_copies: list[tuple[int, int]] = []
        self._num_blocks_sent: dict[str, int] = {}  # requests the runner holds -> block ids handed over
        self._finished_ids: list[str] = []  # finished since the last plan, for the runner to drop
        self.num_preemptions = 0
        self.num_swaps = 0
        # prompt tokens per step while sequences decode (None: the whole budget); the engine sets it
        # from measured step times
        self.prefill_chunk_limit: int | None = None

    def add_request(self, request: Request) -> None:
        """Queue a new request."""
        self.shares.activate(request.tenant)
        self.waiting.append(request)

    def add_children(self, parent: Request, children: list[Request]) -> None:
        """Queue samples 2..n of `parent`; they fork off its KV once its prompt is computed."""
        for child in children:
            self.shares.activate(child.tenant)
        self.pending_children[parent.request_id] = children

    def _waiting_order(self, request: Request) -> tuple:
        if not self.is_slo:
            return self._running_order(request)
        deadline = request.ttft_deadline
        return (*slo_class(request), self.shares.counter(request.tenant), math.inf if deadline is None else deadline,
                request.arrival_time, request.sample_index, request.request_id)

    @property
    def num_unfinished(self) -> int:
        """Requests waiting, running or waiting to fork."""
        return len(self.waiting) + len(self.running) + sum(len(c) for c in self.pending_children.values())

    def _preempt(self, request: Request, out: SchedulerOutput, reason: str = "KV blocks ran out") -> None:
        self.running.remove(request)
        mode = self.preemption_policy(request)
        logger.info("preempted %s (priority %d, %s): %s", request.request_id, request.priority, mode, reason)
        if mode == "swap" and self.kv.can_swap_out(request):
            out.swap_out.extend(self.kv.swap_out(request))
            request.is_swapped = True
            self.num_swaps += 1
        else:
            self.kv.free(request)
            request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self._num_blocks_sent.pop(request.request_id, None)
        self.num_preemptions += 1
        out.preempted_ids.append(request.request_id)
        self.waiting.insert(0, request)
        self._requeue_children(request)

    def _requeue_children(self, parent: Request) -> None:
        # A preempted parent no longer holds its prompt KV: its samples run as ordinary requests.
        for child in self.pending_children.pop(parent.request_id, []):
            child.parent_id = None
            self.waiting.append(child)

    def schedule(self) -> SchedulerOutput:
        """Plan the next step."""
        out = SchedulerOutput(scheduled=[], block_copies=self._pending_copies, finished_ids=self._finished_ids)
        self._pending_copies, self._finished_ids = [], []
        budget = self.config.max_num_batched_tokens
        self.waiting = sorted(self.waiting, key=self._waiting_order)
        if self.is_slo:
            self._preempt_for_ttft(out)
        # 1. running requests, highest priority first; preempt from the back when blocks run out.
        # Decodes are never crowded out: a prompt chunk leaves a token for each decode behind it and,
        # while any sequence decodes, all chunks together stay within prefill_chunk_limit tokens (and, in
        # slo mode, within the tightest TPOT budget). A prompt that would take all the room takes half
        # while requests wait, so a short one is not queued behind a long one for its whole prefill.
        self.running = sorted(self.running, key=self._running_order)  # new list: never empty to readers
        decodes_behind = sum(1 for r in self.running if r.num_tokens - r.num_computed_tokens == 1)
        prefill_room = min(self.prefill_chunk_limit or budget, budget) if decodes_behind else budget
        if decodes_behind:
            prefill_room = min(prefill_room, self._tpot_room(self.running, decodes_behind, budget))
        ran_out = False  # blocks ran out for a running request: nothing waiting is admitted this step
        # slo: a prompt of a lower class pauses while a request with a TTFT target waits, leaving it the room
        urgent = None
        if self.is_slo:
            urgent = min((slo_class(r) for r in self.waiting[:self.config.max_num_seqs]
                          if r.ttft_deadline is not None and not self._is_blocked(r)), default=None)
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_left = request.num_tokens - request.num_computed_tokens
            if num_left == 1:
                decodes_behind -= 1
                num_new = 1
            elif i > 0 and urgent is not None and slo_class(request) > urgent:
                i += 1
                continue
            else:
                room = min(budget - decodes_behind, prefill_room)
                if self.waiting and len(self.running) < self.config.max_num_seqs:
                    room //= 2  # a long prompt leaves half its room to the requests waiting behind it
                num_new = min(num_left, room)
                if i == 0:
                    num_new = max(num_new, 1)  # the first request advances every step (see run_order)
                if num_new <= 0:
                    i += 1
                    continue
            while not self.kv.allocate(request, num_new):
                victim = self.running[-1]
                self._preempt(victim, out)
                ran_out = True
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, num_new))
                budget -= num_new
                if num_left > 1:
                    prefill_room -= num_new
                i += 1
        # 2. waiting requests, unless blocks just ran out (no room to spare)
        self.waiting = sorted(self.waiting, key=self._waiting_order)
        while self.waiting and budget > 0 and prefill_room > 0 and not ran_out \
                and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if self.is_slo and self.running and not self._keeps_tpot(request):
                break  # one more sequence would slow running ones past their TPOT target
            if request.is_swapped:
                # swapped KV comes back only with room for the tokens to compute: a request that took
                # blocks and then failed to allocate would hold them while waiting, and wedge the cache
                num_new = min(request.num_tokens - request.num_computed_tokens, budget)
                if not self.kv.can_swap_in(request, num_new):
                    break
                out.swap_in.extend(self.kv.swap_in(request))
                request.is_swapped = False
            cached = [] if request.num_computed_tokens else self.kv.find_cached_prefix(request)
            num_cached_tokens = len(cached) * self.kv.block_size
            num_left = request.num_tokens - request.num_computed_tokens - num_cached_tokens
            num_new = min(num_left, budget) if num_left == 1 else min(num_left, budget, prefill_room)
            if not self.kv.allocate(request, num_new, cached):
                break
            self.waiting.pop(0)
            if not request.num_computed_tokens:
                self.kv.record_prefix_lookup(request, num_cached_tokens)
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = num_cached_tokens
                request.first_scheduled_time = time.monotonic()
            request.num_computed_tokens += num_cached_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
            if num_left > 1:
                prefill_room -= num_new
        num_forks = 0  # children forked this step: each takes a seat and (at most) one free block
        for item in out.scheduled:
            num_forks += self._plan_fork(item, num_forks)
            self._hand_over(item, out)
        return out

    # --- slo policy ------------------------------------------------------------------------------
    def _predict_decode_s(self, requests: list[Request]) -> float | None:
        """Predicted time of a decode step over `requests`, or None without a fitted model."""
        if self.step_model is None:
            return None
        n = len(requests)
        return self.step_model.predict(StepShape(n, n, sum(r.num_tokens for r in requests)))

    def _keeps_tpot(self, request: Request, running: list[Request] | None = None) -> bool:
        """True when decoding `request` alongside `running` keeps every TPOT target among them."""
        group = [*(self.running if running is None else running), request]
        targets = [t for r in group if (t := r.tpot_target_s) is not None]
        if not targets:
            return True
        share = TPOT_MARGIN if request.tpot_target_s is not None else BULK_TPOT_SHARE
        predicted = self._predict_decode_s(group)
        return predicted is None or predicted <= share * min(targets)

    def _tpot_room(self, running: list[Request], num_decodes: int, budget: int) -> int:
        """Prompt tokens a step may add to its decodes and stay within the tightest running TPOT target."""
        targets = [t for r in running if (t := r.tpot_target_s) is not None]
        if not self.is_slo or not targets or self.step_model is None:
            return budget
        room = self.step_model.max_tokens_within(TPOT_MARGIN * min(targets), len(running), num_decodes,
                                                 sum(r.num_computed_tokens for r in running), budget)
        return budget if room is None else max(room, MIN_PREFILL_CHUNK)

    def _is_blocked(self, request: Request) -> bool:
        """True when `request` could not be admitted now: no seat, too few free blocks, or TPOT targets."""
        if len(self.running) >= self.config.max_num_seqs:
            return True
        num_new = min(request.num_tokens - request.num_computed_tokens, self.config.max_num_batched_tokens)
        if request.is_swapped:
            if not self.kv.can_swap_in(request, num_new):
                return True
        elif self.kv.num_free_blocks < -(-(request.num_computed_tokens + num_new) // self.kv.block_size):
            return True
        return not self._keeps_tpot(request)

    def _would_miss_ttft(self, request: Request, now: float) -> bool:
        """True when waiting for a running request to finish would take `request` past its TTFT deadline."""
        decode_s = self._predict_decode_s(self.running)
        if decode_s is None:
            return True  # no model yet: a blocked urgent request is taken as late
        steps_to_seat = min(r.max_tokens - r.num_output_tokens for r in self.running)
        prefill_s = self.step_model.prefill_seconds(request.num_tokens - request.num_computed_tokens,
                                                    self.config.max_num_batched_tokens) or 0.0
        return now + steps_to_seat * decode_s + prefill_s > request.ttft_deadline

    def unattainable_reason(self, params: SamplingParams, num_prompt_tokens: int, max_tokens: int) -> str | None:
        """Why `params.slo` cannot be met even on an idle engine, or None (also before the step model is fitted)."""
        model, slo = self.step_model, params.slo
        if model is None or slo is None:
            return None
        if slo.ttft_ms is not None:
            ttft_s = model.prefill_seconds(num_prompt_tokens, self.config.max_num_batched_tokens)
            if ttft_s is not None and ttft_s * 1e3 > slo.ttft_ms:
                return (f"the TTFT target of {slo.ttft_ms:g} ms cannot be met even on an idle engine: a "
                        f"{num_prompt_tokens}-token prompt takes about {ttft_s * 1e3:.0f} ms to prefill here")
        if slo.tpot_ms is not None:
            n = params.n
            tpot_s = model.predict(StepShape(n, n, n * (num_prompt_tokens + max_tokens // 2)))
            if tpot_s is not None and tpot_s * 1e3 > slo.tpot_ms:
                return (f"the TPOT target of {slo.tpot_ms:g} ms cannot be met even on an idle engine: a decode "
                        f"step of this request takes about {tpot_s * 1e3:.0f} ms here")
        return None

    def _preempt_for_ttft(self, out: SchedulerOutput) -> None:
        """Preempt lower classes, lowest first, for waiting requests that would otherwise miss their TTFT."""
        now = self.clock()
        for request in list(self.waiting[:self.config.max_num_seqs]):
            if request.ttft_deadline is None or request.first_token_time is not None or not self.running:
                continue
            victims = [r for r in reversed(self.running) if slo_class(r) > slo_class(request)]
            if not victims or not self._is_blocked(request) or not self._would_miss_ttft(request, now):
                continue
            while victims and self._is_blocked(request):
                self._preempt(victims.pop(0), out, f"{request.request_id} (priority {request.priority}) "
                                                   f"would miss its TTFT target")

    def _hand_over(self, item: ScheduledRequest, out: SchedulerOutput) -> None:
        """Describe the item to the runner: everything when it is new to it, else what changed."""
        r = item.request
        table = self.kv.block_tables[r.request_id]
        num_sent = self._num_blocks_sent.get(r.request_id)
        if num_sent is None:
            done = max(len(r.prompt_logprobs) - 1, 0) if r.wants_prompt_logprobs else 0
            out.new_requests.append(NewRequestData(
                r.request_id, list(r.all_token_ids), r.num_prompt_tokens, r.sampling_params, r.generator,
                list(table), r.num_computed_tokens, done))
        else:
            out.cached_requests.append(CachedRequestData(r.request_id, table[num_sent:], r.num_computed_tokens))
        self._num_blocks_sent[r.request_id] = len(table)
        out.num_scheduled_tokens[r.request_id] = item.num_new_tokens
        if item.fork_children:
            out.forks[r.request_id] = [ForkedSample(c.request_id, c.sampling_params, c.generator)
                                       for c in item.fork_children]

    def _plan_fork(self, item: ScheduledRequest, num_forks: int) -> int:
        """Fork the item's children if seats and blocks allow (beyond `num_forks` already promised); how many."""
        children = self.pending_children.get(item.request.request_id)
        if not children or not item.completes_sequence:
            return 0
        seats = self.config.max_num_seqs - len(self.running)
        if len(children) <= min(seats, self.kv.num_free_blocks) - num_forks:
            item.fork_children = self.pending_children.pop(item.request.request_id)
            return len(children)
        self._requeue_children(item.request)  # no room to fork now: ordinary requests (sharing the prefix cache)
        return 0

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> None:
        """Advance counters after a step; `sampled` maps request id -> new token (forked children included)."""
        now = time.monotonic()
        for item in out.scheduled:
            request = item.request
            request.num_computed_tokens += item.num_new_tokens
            self.shares.charge(request.tenant, item.num_new_tokens)
            for child in item.fork_children:
                child.num_computed_tokens = request.num_computed_tokens
                copy = self.kv.fork(request, child)
                if copy is not None:
                    self._pending_copies.append(copy)
                child.status = RequestStatus.RUNNING
                self.running.append(child)
                self._num_blocks_sent[child.request_id] = 0  # the runner forked it; its table comes next step
            for r in [request, *item.fork_children]:
                if r.request_id in sampled:
                    r.output_token_ids.append(sampled[r.request_id])
                    if r.first_token_time is None:
                        r.first_token_time = now

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Mark a request finished (stopped, length or aborted) and free its blocks at once."""
        if not request.status.is_finished:
            self.shares.release(request.tenant)
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)
        if self._num_blocks_sent.pop(request.request_id, None) is not None:
            self._finished_ids.append(request.request_id)
        self._requeue_children(request)
