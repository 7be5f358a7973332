"""Scheduling policies against a fake runner of known step times: fifo, priority and slo.

The step-time model is given fixed coefficients, so every prediction the scheduler acts on is known:
admission against TPOT targets, prompt chunks cut to the TPOT budget, preemption of a lower class for
a TTFT deadline, refusal of unattainable targets, and fair shares across tenants.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_scheduler import BS, FakeRunner, prompt_of, reference, step

from roofline.config import SchedulerConfig
from roofline.engine.fair_share import TenantShares
from roofline.engine.kv_cache import KVCacheManager
from roofline.engine.request import Request, RequestStatus
from roofline.engine.scheduler import BULK_TPOT_SHARE, MIN_PREFILL_CHUNK, TPOT_MARGIN, Scheduler
from roofline.engine.step_model import MIN_SAMPLES, StepShape, StepTimeModel, non_negative_least_squares
from roofline.errors import ConfigError, InvalidRequestError
from roofline.sampling_params import SLO, SamplingParams

# 10 ms per step plus 5 ms per token computed: a decode step of n sequences takes 10 + 5n ms
MODEL = (0.010, 0.0, 0.005, 0.0)


class Clock:
    """A settable clock for deadlines."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(scheduling: str = "slo", max_num_seqs: int = 8, max_num_batched_tokens: int = 64, num_blocks: int = 256,
         coefficients=MODEL, tenant_weights=None):
    kv = KVCacheManager(num_blocks, BS, True, 0)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                             scheduling=scheduling, tenant_weights=tenant_weights or {})
    clock = Clock()
    model = StepTimeModel(coefficients=coefficients) if coefficients else None
    return Scheduler(config, kv, step_model=model, clock=clock), FakeRunner(kv), clock


def request(rid: str, prompt_len: int, max_tokens: int, priority: int = 0, arrival: float = 0.0,
            slo: SLO | None = None, tenant: str = "") -> Request:
    params = SamplingParams(max_tokens=max_tokens, slo=slo)
    r = Request(rid, prompt_of(prompt_len, hash(rid) % 97), params, max_tokens, [], priority=priority,
                arrival_time=arrival)
    r.tenant = tenant
    return r


def started_order(sched, runner, requests, max_steps=500) -> list[str]:
    for r in requests:
        sched.add_request(r)
    started = []
    for _ in range(max_steps):
        if not sched.num_unfinished:
            break
        for s in step(sched, runner).scheduled:
            if s.request.request_id not in started:
                started.append(s.request.request_id)
    return started


# --- the step-time model --------------------------------------------------------------------------
def test_step_model_fits_a_known_linear_cost():
    model = StepTimeModel()
    rng = np.random.default_rng(0)
    true = np.array([0.004, 0.0007, 0.0003, 0.002])
    for _ in range(MIN_SAMPLES - 1):
        model.observe(StepShape(1, 1, 10), 0.005)
    assert not model.is_ready and model.predict(StepShape(1, 1)) is None
    model = StepTimeModel()
    for _ in range(64):
        shape = StepShape(int(rng.integers(1, 32)), int(rng.integers(1, 512)), int(rng.integers(0, 8192)))
        model.observe(shape, float(np.dot(true, shape.features())))
    assert model.is_ready
    np.testing.assert_allclose(model.coefficients, true, rtol=1e-6, atol=1e-9)
    assert model.predict(StepShape(4, 100, 2048)) == pytest.approx(float(np.dot(true, [1, 4, 100, 2])))


def test_predictions_follow_steps_that_run_longer_than_the_fit():
    model = StepTimeModel()
    for n in range(1, 33):
        model.observe(StepShape(n, n), 0.010 + 0.001 * n)
    assert model.bias == pytest.approx(1.0)
    for _ in range(64):  # the host got busy: every step takes half as long again
        model.observe(StepShape(4, 4), 1.5 * (0.010 + 0.004))
    assert model.predict(StepShape(4, 4)) == pytest.approx(1.5 * 0.014, rel=0.02)


def test_non_negative_least_squares_never_returns_a_negative_cost():
    x = np.array([[1.0, n, n] for n in range(1, 20)])
    y = 0.01 + 0.002 * x[:, 1] - 0.0005 * x[:, 2]  # collinear terms with a negative one
    c = non_negative_least_squares(x, y)
    assert np.all(c >= 0)
    np.testing.assert_allclose(x @ c, y, atol=1e-9)


def test_step_model_budget_helpers():
    model = StepTimeModel(coefficients=MODEL)
    # 2 decodes in a 3-sequence step: 10 + 2*5 = 20 ms fixed; 50 ms leave 30 ms = 6 tokens
    assert model.max_tokens_within(0.050, 3, 2, 0, limit=64) == 6
    assert model.max_tokens_within(0.050, 3, 2, 0, limit=4) == 4
    assert model.max_tokens_within(0.015, 3, 2, 0, limit=64) == 0
    # a 100-token prompt in chunks of 64: (10 + 320) + (10 + 180) ms
    assert model.prefill_seconds(100, 64) == pytest.approx(0.520)
    with pytest.raises(ValueError):
        StepTimeModel(coefficients=(0.1, -1, 0, 0))


# --- ordering policies -----------------------------------------------------------------------------
@pytest.mark.parametrize("scheduling, expected", [
    ("fifo", ["low", "first", "mid", "second"]),
    ("priority", ["first", "second", "mid", "low"]),
    ("slo", ["first", "second", "mid", "low"]),
])
def test_policies_order_waiting_requests(scheduling, expected):
    sched, runner, _ = make(scheduling, max_num_seqs=1)
    specs = [("low", 2, 0.0), ("first", 0, 1.0), ("mid", 1, 2.0), ("second", 0, 3.0)]
    requests = [request(rid, 3, 2, priority=p, arrival=a) for rid, p, a in specs]
    assert started_order(sched, runner, requests) == expected
    for r in requests:
        assert r.output_token_ids == reference(r.prompt_token_ids, r.max_tokens)


def test_slo_mode_puts_deadlines_first_and_earliest_first():
    sched, runner, _ = make(max_num_seqs=1, coefficients=None)
    requests = [request("plain", 3, 2, arrival=0.0), request("late-deadline", 3, 2, arrival=1.0, slo=SLO(5000)),
                request("early-deadline", 3, 2, arrival=2.0, slo=SLO(1000))]
    assert started_order(sched, runner, requests) == ["early-deadline", "late-deadline", "plain"]


def test_bad_scheduling_settings_are_refused():
    with pytest.raises(ConfigError, match="scheduling must be one of fifo, priority, slo"):
        SchedulerConfig(scheduling="edf")
    with pytest.raises(ConfigError, match="weight must be a number > 0"):
        SchedulerConfig(tenant_weights={"a": 0})
    with pytest.raises(InvalidRequestError, match="slo.ttft_ms must be a number of milliseconds > 0"):
        SamplingParams(slo=SLO(ttft_ms=-1))
    assert SamplingParams(slo={"tpot_ms": 50}).slo == SLO(tpot_ms=50)
    assert SamplingParams(slo=SLO()).slo is None


# --- admission and chunk sizing against TPOT -----------------------------------------------------------
def test_admission_keeps_running_requests_within_their_tpot():
    # 10 + 5n ms per decode step: a 35 ms TPOT planned at 85% (29.75 ms) allows 3 sequences
    assert TPOT_MARGIN == 0.85
    sched, runner, _ = make(max_num_seqs=8)
    requests = [request(f"r{i}", 3, 6, arrival=i, slo=SLO(tpot_ms=35)) for i in range(6)]
    for r in requests:
        sched.add_request(r)
    widest = 0
    while sched.num_unfinished:
        out = step(sched, runner)
        widest = max(widest, len(sched.running))
        decodes = [s for s in out.scheduled if s.request.num_computed_tokens > s.request.num_prompt_tokens]
        if len(decodes) == len(out.scheduled):  # decode-only steps meet the target
            assert sched.step_model.predict(StepShape(len(decodes), len(decodes))) <= 0.035 * TPOT_MARGIN
    assert widest == 3
    assert all(r.output_token_ids == reference(r.prompt_token_ids, 6) for r in requests)


def test_requests_without_targets_leave_room_for_the_next_with_one():
    # one chat with a 105 ms TPOT: bulk requests join only while a decode step stays within 73.5 ms (10 + 5n: n <= 12)
    assert BULK_TPOT_SHARE == 0.7
    sched, runner, _ = make(max_num_seqs=32)
    sched.add_request(request("chat", 3, 40, slo=SLO(tpot_ms=105)))
    step(sched, runner)
    for i in range(20):
        sched.add_request(request(f"bulk{i}", 3, 40, priority=1, arrival=1.0 + i))
    for _ in range(12):  # prompts come in a few per step (the chunk budget), then admission stops
        step(sched, runner)
    assert len(sched.running) == 12


def test_admission_without_targets_fills_the_seats():
    sched, runner, _ = make(max_num_seqs=8)
    for i in range(6):
        sched.add_request(request(f"r{i}", 3, 6, arrival=i))
    step(sched, runner)
    assert len(sched.running) == 6


def test_prompt_chunks_are_cut_to_the_tightest_tpot_budget():
    sched, runner, _ = make(max_num_batched_tokens=256, num_blocks=1024)
    decoder = request("chat", 3, 500, arrival=0.0, slo=SLO(tpot_ms=200))
    sched.add_request(decoder)
    step(sched, runner)  # its prompt
    bulk = request("bulk", 1000, 4, priority=1, arrival=1.0)
    sched.add_request(bulk)
    chunks = []
    while bulk.num_computed_tokens < bulk.num_prompt_tokens:
        out = step(sched, runner)
        chunks += [s.num_new_tokens for s in out.scheduled if s.request is bulk]
        assert sched.step_model.predict(StepShape(len(out.scheduled), out.num_batched_tokens)) <= 0.200 * TPOT_MARGIN
    # 85% of 200 ms, less 10 ms and 5 ms for the decode, leave 155 ms = 31 prompt tokens a step
    assert max(chunks) == 31 and sum(chunks) == 1000


def test_a_tight_budget_still_lets_prompts_advance():
    sched, runner, _ = make(max_num_batched_tokens=256)
    # two decodes take 20 ms, within 70% of 30 ms, and leave 85% x 30 - 20 = 5.5 ms: room for one prompt token
    sched.add_request(request("chat", 3, 200, slo=SLO(tpot_ms=30)))
    step(sched, runner)
    bulk = request("bulk", 100, 2, priority=1, arrival=1.0)
    sched.add_request(bulk)
    out = step(sched, runner)
    assert [s.num_new_tokens for s in out.scheduled if s.request is bulk] == [MIN_PREFILL_CHUNK]


def test_without_slo_mode_chunks_use_the_whole_budget():
    sched, runner, _ = make("priority", max_num_batched_tokens=256)
    sched.add_request(request("chat", 3, 100, slo=SLO(tpot_ms=200)))
    step(sched, runner)
    bulk = request("bulk", 1000, 4, priority=1, arrival=1.0)
    sched.add_request(bulk)
    out = step(sched, runner)
    assert [s.num_new_tokens for s in out.scheduled if s.request is bulk] == [255]


def test_a_lower_class_prompt_pauses_while_a_deadline_waits():
    sched, runner, clock = make(max_num_batched_tokens=64)
    chat = request("chat", 3, 50, arrival=0.0, slo=SLO(ttft_ms=1000))
    sched.add_request(chat)
    step(sched, runner)
    bulk = request("bulk", 600, 4, priority=1, arrival=1.0)
    sched.add_request(bulk)
    step(sched, runner)
    assert 0 < bulk.num_computed_tokens < 600
    urgent = request("chat2", 40, 4, arrival=2.0, slo=SLO(ttft_ms=1000))
    sched.add_request(urgent)
    out = step(sched, runner)
    assert {s.request.request_id: s.num_new_tokens for s in out.scheduled} == {"chat": 1, "chat2": 40}
    out = step(sched, runner)  # nothing urgent waits: the bulk prompt goes on
    assert "bulk" in {s.request.request_id for s in out.scheduled}


# --- preemption for a TTFT deadline --------------------------------------------------------------------
def test_a_lower_class_is_preempted_when_a_deadline_would_be_missed():
    sched, runner, clock = make(max_num_seqs=2)
    batch = [request(f"batch{i}", 8, 50, priority=1, arrival=i) for i in range(2)]
    for r in batch:
        sched.add_request(r)
    for _ in range(3):
        step(sched, runner)
    clock.now = 10.0
    # seats are full and the batch requests have ~47 tokens to go (47 x 20 ms): a 300 ms TTFT would be missed
    urgent = request("chat", 8, 4, priority=0, arrival=10.0, slo=SLO(ttft_ms=300))
    sched.add_request(urgent)
    out = step(sched, runner)
    assert out.preempted_ids == ["batch1"]  # the later of the lowest class
    assert urgent in sched.running and batch[0] in sched.running
    assert batch[1].status == RequestStatus.PREEMPTED
    while sched.num_unfinished:
        step(sched, runner)
    for r in [*batch, urgent]:
        assert r.output_token_ids == reference(r.prompt_token_ids, r.max_tokens)


def test_no_preemption_when_a_seat_frees_in_time():
    sched, runner, clock = make(max_num_seqs=2)
    for i in range(2):
        sched.add_request(request(f"batch{i}", 8, 5, priority=1, arrival=i))
    step(sched, runner)
    clock.now = 10.0
    urgent = request("chat", 8, 4, priority=0, arrival=10.0, slo=SLO(ttft_ms=1000))  # 4 steps x 20 ms: in time
    sched.add_request(urgent)
    outs = [step(sched, runner) for _ in range(8)]
    assert not any(o.preempted_ids for o in outs)
    assert urgent.first_token_time is not None


def test_the_same_class_is_never_preempted_for_a_deadline():
    sched, runner, clock = make(max_num_seqs=2)
    for i in range(2):
        sched.add_request(request(f"chat{i}", 8, 50, arrival=i, slo=SLO(ttft_ms=100)))
    step(sched, runner)
    sched.add_request(request("chat2", 8, 4, arrival=clock.now, slo=SLO(ttft_ms=100)))
    assert not any(step(sched, runner).preempted_ids for _ in range(5))


def test_priority_mode_never_preempts_for_a_deadline():
    sched, runner, clock = make("priority", max_num_seqs=2)
    for i in range(2):
        sched.add_request(request(f"batch{i}", 8, 50, priority=1, arrival=i))
    step(sched, runner)
    sched.add_request(request("chat", 8, 4, priority=0, arrival=clock.now, slo=SLO(ttft_ms=100)))
    assert not any(step(sched, runner).preempted_ids for _ in range(5))


# --- refusing targets no idle engine meets ----------------------------------------------------------
def test_unattainable_targets_are_refused_with_the_prediction():
    sched, _, _ = make(max_num_batched_tokens=64)
    # a 100-token prompt takes 520 ms to prefill here; a decode step of one sequence 15 ms
    reason = sched.unattainable_reason(SamplingParams(slo=SLO(ttft_ms=500)), 100, 16)
    assert reason == ("the TTFT target of 500 ms cannot be met even on an idle engine: a 100-token prompt "
                      "takes about 520 ms to prefill here")
    assert sched.unattainable_reason(SamplingParams(slo=SLO(ttft_ms=600)), 100, 16) is None
    assert "TPOT target of 10 ms" in sched.unattainable_reason(SamplingParams(slo=SLO(tpot_ms=10)), 10, 16)
    assert sched.unattainable_reason(SamplingParams(slo=SLO(tpot_ms=20)), 10, 16) is None
    unfitted, _, _ = make(coefficients=None)
    assert unfitted.unattainable_reason(SamplingParams(slo=SLO(ttft_ms=1)), 100, 16) is None


# --- fair shares across tenants ------------------------------------------------------------------------
def tokens_while_both_backlogged(scheduling: str, weights=None) -> dict[str, int]:
    """A floods 10 requests for each of B's (interleaved arrivals); tokens per tenant while both have some waiting."""
    sched, runner, _ = make(scheduling, max_num_seqs=4, tenant_weights=weights)
    requests = [request(f"{t}{i}", 4, 8, arrival=float(i), tenant=t)
                for i in range(220) for t in ["b" if i % 11 == 10 else "a"]]
    for r in requests:
        sched.add_request(r)
    tokens = {"a": 0, "b": 0}
    while {r.tenant for r in sched.waiting} == {"a", "b"}:
        out = step(sched, runner)
        for s in out.scheduled:
            if s.completes_sequence:
                tokens[s.request.tenant] += 1
    return tokens


def test_fair_shares_give_a_light_tenant_half_the_tokens():
    fifo = tokens_while_both_backlogged("fifo")
    fair = tokens_while_both_backlogged("slo")
    assert fifo["b"] / sum(fifo.values()) < 0.15  # arrival order: one in eleven
    assert fair["b"] / sum(fair.values()) >= 0.40


def test_tenant_weights_scale_the_shares():
    fair = tokens_while_both_backlogged("slo", weights={"a": 3.0})
    assert 0.15 <= fair["b"] / sum(fair.values()) <= 0.35  # about a quarter


def test_an_idle_tenant_banks_no_credit():
    shares = TenantShares()
    shares.activate("a")
    shares.charge("a", 1000)
    shares.activate("b")  # b arrives while a is active: it starts level with a
    assert shares.counter("b") == shares.counter("a") == 1000
    shares.release("b")
    shares.charge("a", 500)
    shares.activate("b")
    assert shares.counter("b") == 1500
    with pytest.raises(ValueError):
        TenantShares({"x": 0})


# --- the engine fits the model to its own steps -------------------------------------------------------
def test_the_engine_fits_its_step_model_and_refuses_what_it_cannot_meet(tiny_model_dirs):
    from roofline import LLM
    from roofline.errors import SLOUnattainableError

    llm = LLM(tiny_model_dirs["llama-5heads-mqa-tied"], kv_cache_memory=16 << 20, max_num_batched_tokens=32)
    assert not llm.engine.step_model.is_ready
    llm.generate([[5 + i] * (3 + 7 * i) for i in range(6)], SamplingParams(max_tokens=24, ignore_eos=True))
    model = llm.engine.step_model
    assert model.is_ready and min(model.coefficients) >= 0
    assert model.predict(StepShape(1, 64)) >= model.predict(StepShape(1, 1)) > 0
    with pytest.raises(SLOUnattainableError, match="cannot be met even on an idle engine"):
        llm.generate([5, 6, 7], SamplingParams(max_tokens=2, slo=SLO(ttft_ms=1e-6)))
    fifo = LLM(tiny_model_dirs["llama-5heads-mqa-tied"], kv_cache_memory=16 << 20, scheduling="fifo")
    fifo.engine.step_model = model  # fitted, but fifo ignores targets
    assert fifo.generate([5, 6, 7], SamplingParams(max_tokens=2, slo=SLO(ttft_ms=1e-6)))[0].finished
