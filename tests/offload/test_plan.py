"""Choosing a placement within a memory limit: the planner's best fit, the KV budget from the same limit, errors."""

from __future__ import annotations

import dataclasses

import pytest

from roofline import LLM, SamplingParams
from roofline.config import ModelConfig, OffloadConfig
from roofline.errors import ConfigError
from roofline.offload.plan import plan_offload
from roofline.planner.formats import get_weight_format

FP32 = get_weight_format("fp32")
# the 4-layer tiny llama below: about 1 MB of fp32 weights
TINY = ModelConfig("llama", vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=4, num_heads=4,
                   num_kv_heads=4, head_dim=16, max_position_embeddings=256, attention_bias=True)


def _plan(limit: int | None, offload: str = "auto", kv_memory: int | None = None):
    return plan_offload(TINY, FP32, OffloadConfig(limit, offload), False, 64, 8, kv_memory)


def test_without_a_limit_or_with_offload_none_nothing_is_planned():
    assert _plan(None) is None
    assert _plan(10**6, "none") is None


def test_auto_offloads_what_does_not_fit_and_keeps_within_the_limit():
    small, large = _plan(800_000), _plan(8_000_000)
    assert small.placement.offloaded_layers and small.memory.total <= 800_000
    assert not large.placement.is_offloaded and large.memory.total <= 8_000_000
    assert small.predicted_tok_s < large.predicted_tok_s
    # the KV cache gets what the limit holds beyond weights, buffers and activations
    assert small.kv_bytes == int(800_000 - small.memory.weights - small.memory.activations)
    assert small.memory.kv_cache <= small.kv_bytes
    assert "predicted" in small.describe() and small.placement.describe() in small.describe()


def test_a_model_that_cannot_run_even_offloaded_gets_one_line_with_what_it_needs():
    with pytest.raises(ConfigError, match=r"needs at least \d+\.\d+ KB even with every layer offloaded") as info:
        _plan(400_000)
    assert "\n" not in str(info.value) and "400.00 KB" in str(info.value)


def test_a_given_placement_is_checked_against_the_limit():
    with pytest.raises(ConfigError, match="offload w=100/0/0 needs .* for one sequence of 64 tokens"):
        _plan(800_000, "w=100/0/0")
    given = _plan(800_000, "w=0/50/50")
    assert given.placement.describe() == "w0/50/50 kv100/0" and given.kv_bytes > 0
    unlimited = _plan(None, "w=0/0/100")
    assert unlimited.kv_bytes is None and unlimited.predicted_tok_s > 0  # no limit: the usual KV rule
    with pytest.raises(ConfigError, match="KV blocks in host RAM are not supported yet"):
        _plan(800_000, "w=0/0/100,kv=50/50")


def test_an_explicit_kv_budget_is_kept_when_it_fits():
    assert _plan(8_000_000, kv_memory=100_000).kv_bytes == 100_000


@pytest.mark.parametrize("value, message", [(0, "memory limit must be positive"),
                                            ("w20/80/0", "offload must be auto, none or a placement")])
def test_bad_offload_config_is_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        OffloadConfig(memory_limit=value) if value == 0 else OffloadConfig(offload=value)


@pytest.fixture(scope="module")
def tiny_dir(reference, tmp_path_factory) -> str:
    spec = reference.specs["llama-mha-bias-linear-rope"]
    spec = dataclasses.replace(spec, config={**spec.config, "num_hidden_layers": 4})
    path = str(tmp_path_factory.mktemp("offload-auto"))
    reference.save_tiny_model(spec, path, seed=5)
    return path


def test_llm_with_a_memory_limit_runs_the_planned_placement_with_resident_outputs(tiny_dir):
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=1)
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    want = LLM(tiny_dir, max_model_len=64, max_num_seqs=8, swap_space=0).generate(prompts, params)
    llm = LLM(tiny_dir, max_model_len=64, max_num_seqs=8, swap_space=0, memory_limit="1MB")
    plan = llm.engine.runner.offload_plan
    expected = _plan(1_000_000)
    assert (plan.placement, plan.kv_bytes, plan.predicted_tok_s) == (expected.placement, expected.kv_bytes,
                                                                     expected.predicted_tok_s)
    assert plan.placement.offloaded_layers
    # the KV cache holds no more than the limit left for it
    assert llm.engine.kv.num_blocks * 16 * llm.engine.runner.kv_bytes_per_token <= plan.kv_bytes
    got = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    llm.engine.runner.streamer.close()


def test_the_engine_and_the_plan_search_choose_the_same_placement():
    from roofline.offload.plan import _workload, engine_hardware
    from roofline.planner.model_spec import spec_from_config
    from roofline.planner.search import PlanRequest, search

    for limit in (800_000, 1_000_000, 8_000_000):  # 4 layers: the search's 25% steps are whole layers
        hw = engine_hardware(False, limit)
        result = search(spec_from_config(TINY, native_format=FP32), hw,
                        PlanRequest(workload=_workload(TINY, 64), weight_formats=("fp32",), max_batch=8))
        assert _plan(limit).placement.fractions() == result.plans[0].layout.placement
