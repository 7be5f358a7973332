"""RequestOutput carries the engine's own timestamps of a request's phases: queue, prefill, decode."""

from __future__ import annotations

import pytest

from roofline.llm import LLM
from roofline.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model="default", kv_cache_memory=64 << 20)


def _run(llm: LLM, prompts: list[str], params: SamplingParams) -> dict[str, list]:
    """Every RequestOutput each request produced, in order."""
    engine = llm.engine
    seen: dict[str, list] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
    return seen


def test_phase_timestamps_are_ordered_and_final_only_when_finished(llm):
    seen = _run(llm, ["The sky is", "Once upon a time"], SamplingParams(max_tokens=4, temperature=0,
                                                                          ignore_eos=True))
    for outs in seen.values():
        *partial, final = outs
        assert final.finished and len(outs) == 4  # one snapshot per token
        assert all(o.finished_time is None and o.decode_time is None for o in partial)
        assert final.arrival_time <= final.first_scheduled_time <= final.first_token_time <= final.finished_time
        assert final.queue_time == pytest.approx(final.first_scheduled_time - final.arrival_time)
        assert final.prefill_time == pytest.approx(final.first_token_time - final.first_scheduled_time)
        assert final.decode_time == pytest.approx(final.finished_time - final.first_token_time)
        assert final.decode_time > 0  # three more steps ran after the first token
        assert {o.first_token_time for o in outs} == {final.first_token_time}  # set once, never moved


def test_n_samples_finish_when_the_last_does(llm):
    params = SamplingParams(max_tokens=3, temperature=1.0, n=3, seed=7)
    final = _run(llm, ["Hello"], params)["r0"][-1]
    group = [r for r in final.outputs]
    assert final.finished and len(group) == 3
    assert final.finished_time is not None and final.finished_time >= final.first_token_time
