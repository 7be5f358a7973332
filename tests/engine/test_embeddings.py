"""Embedding requests through the engine: pooled hidden states against transformers, chunked and batched."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from roofline import LLM
from roofline.engine.pooling import PooledChunk, PoolingAccumulator, configured_pooling, truncate_embedding
from roofline.errors import ContextOverflowError, InvalidRequestError
from roofline.sampling_params import SamplingParams

MODEL = "llama-5heads-mqa-tied"
MAX_MODEL_LEN = 96
BUDGET = 16  # max_num_batched_tokens: every prompt past 16 tokens is chunked
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, reference) -> str:
    path = str(tmp_path_factory.mktemp("embed-model"))
    reference.save_tiny_model(reference.specs[MODEL], path, seed=3)
    return path


@pytest.fixture(scope="module")
def hf(model_dir, reference):
    return reference.load_hf_reference(model_dir)


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return LLM(model_dir, dtype="float32", device="cpu", kv_cache_memory=4 << 20, max_model_len=MAX_MODEL_LEN,
               max_num_batched_tokens=BUDGET, max_num_seqs=8)


@torch.inference_mode()
def expected(hf, ids: list[int], pooling: str) -> torch.Tensor:
    """transformers' final normed hidden states over the whole prompt at once, pooled and normalized."""
    hidden = hf.model(torch.tensor([ids])).last_hidden_state[0].float()  # [T, hidden], after the final norm
    vector = hidden[-1] if pooling == "last" else hidden.mean(dim=0)
    return vector / vector.norm()


def assert_close(actual: list[float], wanted: torch.Tensor) -> None:
    got = torch.tensor(actual)
    assert got.shape == wanted.shape
    assert (got - wanted).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_chunked_prompts_match_transformers(llm, hf, reference, pooling):
    prompts = [reference.random_prompt(n, seed=n) for n in (3, 17, 50, MAX_MODEL_LEN)]  # the last fills the context
    vectors = llm.embed(prompts, pooling=pooling)
    assert len(vectors) == len(prompts)
    for ids, vector in zip(prompts, vectors):
        assert_close(vector, expected(hf, ids, pooling))
        assert abs(float(torch.tensor(vector).norm()) - 1.0) < 1e-5
    assert not llm.engine.has_unfinished_requests() and llm.engine.kv.usage == 0


def test_embeddings_share_steps_with_generation(llm, hf, reference, monkeypatch):
    engine = llm.engine
    gen_prompt = reference.random_prompt(6, seed=100)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = llm.generate([gen_prompt], greedy)[0].outputs[0].token_ids
    plans = []
    execute = engine.runner.execute

    def spy(plan):
        plans.append({rid: n for rid, n in plan.num_scheduled_tokens.items()})
        return execute(plan)

    monkeypatch.setattr(engine.runner, "execute", spy)
    engine.add_request("gen", gen_prompt, greedy)
    engine.step()  # the generation is decoding before the embeddings arrive
    embed_prompts = {f"emb{i}": reference.random_prompt(40 + i, seed=200 + i) for i in range(3)}
    pooling = {"emb0": "last", "emb1": "mean", "emb2": "last"}
    for rid, ids in embed_prompts.items():
        engine.add_request(rid, ids, SamplingParams(pooling=pooling[rid]))
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    assert final["gen"].outputs[0].token_ids == alone
    assert final["gen"].embedding is None
    for rid, ids in embed_prompts.items():
        assert final[rid].outputs[0].token_ids == [] and final[rid].outputs[0].finish_reason == "stop"
        assert_close(final[rid].embedding, expected(hf, ids, pooling[rid]))
    # prompts of 40+ tokens were chunked into steps in which the generation kept decoding
    mixed = [p for p in plans if p.get("gen") == 1 and any(rid in p for rid in embed_prompts)]
    assert len(mixed) >= 3
    assert all(sum(p.values()) <= BUDGET for p in plans)


def test_prefix_cache_leaves_vectors_unchanged(llm, hf, reference):
    prefix = reference.random_prompt(48, seed=300)
    longer = prefix + reference.random_prompt(9, seed=301)
    llm.embed([prefix])  # its full blocks are now in the prefix cache
    engine = llm.engine
    outs = {}
    for rid, pooling in (("last", "last"), ("mean", "mean")):
        engine.add_request(rid, longer, SamplingParams(pooling=pooling))
    while engine.has_unfinished_requests():
        outs.update((o.request_id, o) for o in engine.step() if o.finished)
    assert outs["last"].num_cached_tokens > 0  # last-token pooling takes the cached prefix
    assert outs["mean"].num_cached_tokens == 0  # mean pooling needs every position: it bypasses the cache
    assert_close(outs["last"].embedding, expected(hf, longer, "last"))
    assert_close(outs["mean"].embedding, expected(hf, longer, "mean"))


def test_text_inputs_and_dimensions(llm, hf):
    text = "w10 w11 w12 w13 w14"
    ids = llm.tokenizer.encode(text)
    full = llm.embed(text)[0]
    assert_close(full, expected(hf, ids, "last"))
    short = llm.embed([text], dimensions=8)[0]
    head = expected(hf, ids, "last")[:8]
    assert_close(short, head / head.norm())
    assert len(llm.embed(text, dimensions=llm.engine.model_config.hidden_size)[0]) == len(full)


def test_bad_inputs_are_refused(llm, reference):
    hidden = llm.engine.model_config.hidden_size
    with pytest.raises(InvalidRequestError, match="dimensions"):
        llm.embed("w10", dimensions=hidden + 1)
    with pytest.raises(InvalidRequestError, match="dimensions"):
        llm.embed("w10", dimensions=0)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.embed([""])
    with pytest.raises(InvalidRequestError, match="no inputs"):
        llm.embed([])
    with pytest.raises(ContextOverflowError, match="context limit"):
        llm.embed([reference.random_prompt(MAX_MODEL_LEN + 1, seed=5)])
    with pytest.raises(InvalidRequestError, match="pooling"):
        llm.embed("w10", pooling="cls")
    with pytest.raises(InvalidRequestError, match="embedding request"):
        SamplingParams(pooling="last", n=2)
    assert not llm.engine.has_unfinished_requests()


def test_abort_frees_an_embedding_request(llm, reference):
    engine = llm.engine
    engine.add_request("cut", reference.random_prompt(60, seed=9), SamplingParams(pooling="mean"))
    assert engine.step() == []  # a first chunk: nothing to report yet
    engine.abort("cut")
    engine.step()
    assert not engine.has_unfinished_requests() and engine.kv.usage == 0


def test_accumulator_restarts_after_a_recompute():
    acc = PoolingAccumulator("mean")
    acc.add(PooledChunk(0, 2, torch.tensor([4.0, 0.0]), False))
    acc.add(PooledChunk(0, 2, torch.tensor([0.0, 2.0]), False))  # preempted and recomputed from the start
    acc.add(PooledChunk(2, 2, torch.tensor([0.0, 2.0]), True))
    assert acc.vector() == [0.0, 1.0]
    with pytest.raises(RuntimeError):
        acc.add(PooledChunk(7, 1, torch.tensor([1.0, 0.0]), True))


def test_truncate_embedding_renormalizes():
    assert truncate_embedding([0.6, 0.8, 0.0], None) == [0.6, 0.8, 0.0]
    assert truncate_embedding([0.6, 0.0, 0.8], 1) == [1.0]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preempted_embeddings_keep_their_vectors(model_dir, hf, reference, mode):
    # 6 blocks of 16 tokens: 60-token inputs and a generation to 88 tokens cannot all hold their KV at once
    per_block = 16 * reference.load_roofline_model(model_dir).config.num_layers * 2 * 1 * 16 * 4
    small = LLM(model_dir, dtype="float32", device="cpu", kv_cache_memory=6 * per_block, max_model_len=MAX_MODEL_LEN,
                max_num_batched_tokens=BUDGET, max_num_seqs=8, preemption_mode=mode, swap_space=64 * per_block)
    assert small.engine.kv.num_blocks == 6
    engine = small.engine
    engine.add_request("gen", reference.random_prompt(8, seed=1), SamplingParams(temperature=0.0, max_tokens=80,
                                                                                  ignore_eos=True))
    prompts = {f"e{i}": reference.random_prompt(60, seed=400 + i) for i in range(3)}
    for i, (rid, ids) in enumerate(prompts.items()):
        engine.add_request(rid, ids, SamplingParams(pooling="mean" if i % 2 else "last"))
    final = {}
    while engine.has_unfinished_requests():
        final.update((o.request_id, o) for o in engine.step() if o.finished)
    assert engine.scheduler.num_preemptions > 0
    for i, (rid, ids) in enumerate(prompts.items()):
        assert_close(final[rid].embedding, expected(hf, ids, "mean" if i % 2 else "last"))


def test_a_sentence_transformers_pooling_config_sets_the_default(model_dir, hf, reference, tmp_path):
    st_dir = tmp_path / "st-model"
    shutil.copytree(model_dir, st_dir)
    (st_dir / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (st_dir / "1_Pooling").mkdir()
    (st_dir / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True,
                                                                 "pooling_mode_lasttoken": False}))
    st = LLM(str(st_dir), dtype="float32", device="cpu", kv_cache_memory=1 << 20, max_model_len=MAX_MODEL_LEN)
    assert st.engine.default_pooling == "mean"
    ids = reference.random_prompt(20, seed=77)
    assert_close(st.embed([ids])[0], expected(hf, ids, "mean"))
    assert_close(st.embed([ids], pooling="last")[0], expected(hf, ids, "last"))
    assert configured_pooling(model_dir) == configured_pooling("default") == "last"
