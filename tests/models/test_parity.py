"""Tiny random-weight models of every supported family agree with transformers in fp32.

Each model in conftest.TINY_MODELS is saved by transformers, loaded by roofline, and compared:
logits at every position (max abs diff within 1e-4 of the largest |logit|), 32 greedy tokens,
generated and prompt logprobs against an independent log-softmax of transformers' logits, and
batched, chunked and prefix-cached generation.
"""

from __future__ import annotations

import pytest
import torch

from roofline import LLM, SamplingParams

TOL = 1e-4
NUM_TOKENS = 32


@pytest.fixture(scope="module")
def pair(tiny_model_name, tiny_model_dirs, reference):
    """(transformers model, roofline LLM) for one tiny model."""
    path = tiny_model_dirs[tiny_model_name]
    hf = reference.load_hf_reference(path)
    llm = LLM(model=path, dtype="float32", device="cpu", kv_cache_memory=16 << 20)
    return hf, llm


def _check_logprobs(entries, chosen_ids: list[int], ref_logprobs: torch.Tensor, top_n: int) -> None:
    """Each entry holds the chosen token and a top-N of the reference distribution, with its logprobs."""
    assert len(entries) == len(chosen_ids) == len(ref_logprobs)
    for entry, chosen, ref in zip(entries, chosen_ids, ref_logprobs):
        assert chosen in entry
        nth_best = ref.topk(top_n).values[-1].item()
        for token_id, lp in entry.items():
            assert abs(lp.logprob - ref[token_id].item()) <= TOL, (token_id, lp.logprob, ref[token_id].item())
            if token_id != chosen:
                assert ref[token_id].item() >= nth_best - TOL  # a true top-N token, up to ties
        assert len(entry) >= top_n


def test_config_matches_transformers(pair):
    hf, llm = pair
    cfg, hc = llm.engine.model_config, hf.config
    head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (hc.num_attention_heads, hc.num_key_value_heads,
                                                              head_dim)
    assert cfg.tie_word_embeddings == hc.tie_word_embeddings
    assert cfg.rope_theta == hc.rope_parameters["rope_theta"]
    if hc.rope_parameters.get("rope_type", "default") != "default":
        assert cfg.rope_scaling["rope_type"] == hc.rope_parameters["rope_type"]
        assert cfg.rope_scaling["factor"] == hc.rope_parameters["factor"]


def test_logits_match_at_every_position(pair, reference):
    hf, llm = pair
    # 60 tokens: well past the llama3 model's original_max_position_embeddings (32)
    prompt = reference.random_prompt(60, seed=1)
    ours = reference.roofline_full_logits(llm.engine.runner.model, prompt)
    ref = reference.hf_full_logits(hf, prompt)
    assert ours.shape == ref.shape
    assert reference.relative_error(ours, ref) <= TOL


def test_greedy_tokens_and_logprobs_match(pair, reference):
    hf, llm = pair
    prompt = reference.random_prompt(20, seed=2)
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=5, prompt_logprobs=5)
    out = llm.generate([prompt], params)[0]
    generated = out.outputs[0].token_ids
    assert generated == reference.hf_greedy(hf, prompt, NUM_TOKENS)

    # the reference distribution at every position of prompt + completion, from one forward pass
    ref = torch.log_softmax(reference.hf_full_logits(hf, prompt + generated), dim=-1)
    _check_logprobs(out.outputs[0].logprobs, generated, ref[len(prompt) - 1:-1], top_n=5)
    assert out.prompt_logprobs[0] is None
    _check_logprobs(out.prompt_logprobs[1:], prompt[1:], ref[:len(prompt) - 1], top_n=5)


def test_batched_prompts_of_different_lengths_match(pair, reference):
    hf, llm = pair
    prompts = [reference.random_prompt(n, seed=10 + n) for n in (3, 17, 40, 9)]
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == reference.hf_greedy(hf, prompt, NUM_TOKENS)


@pytest.mark.parametrize("name", ["llama3-rope-scaling-gqa4", "qwen3-qknorm-headdim32"])
def test_chunked_prefill_and_prefix_cache_match(name, tiny_model_dirs, reference):
    path = tiny_model_dirs[name]
    hf = reference.load_hf_reference(path)
    # 16-token steps split a 45-token prompt into chunks that attend to the cached K/V of earlier chunks
    llm = LLM(model=path, dtype="float32", device="cpu", kv_cache_memory=16 << 20, max_num_batched_tokens=16)
    prompt = reference.random_prompt(45, seed=3)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3, prompt_logprobs=3)
    out = llm.generate([prompt], params)[0]
    generated = out.outputs[0].token_ids
    assert generated == reference.hf_greedy(hf, prompt, 8)
    ref = torch.log_softmax(reference.hf_full_logits(hf, prompt + generated), dim=-1)
    _check_logprobs(out.prompt_logprobs[1:], prompt[1:], ref[:len(prompt) - 1], top_n=3)
    _check_logprobs(out.outputs[0].logprobs, generated, ref[len(prompt) - 1:-1], top_n=3)

    # a second prompt sharing the first 32 tokens (two full blocks) may reuse their cached K/V
    second = prompt[:32] + reference.random_prompt(7, seed=4)
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=3)
    out = llm.generate([second], params)[0]
    generated = out.outputs[0].token_ids
    assert generated == reference.hf_greedy(hf, second, NUM_TOKENS)
    ref = torch.log_softmax(reference.hf_full_logits(hf, second + generated), dim=-1)
    _check_logprobs(out.outputs[0].logprobs, generated, ref[len(second) - 1:-1], top_n=3)


def test_llama3_rope_scaling_is_exercised(tiny_model_dirs, reference):
    """The llama3 parity above is only meaningful if dropping the scaling would change the logits."""
    path = tiny_model_dirs["llama3-rope-scaling-gqa4"]
    prompt = reference.random_prompt(60, seed=1)
    scaled = reference.roofline_full_logits(reference.load_roofline_model(path), prompt)
    unscaled = reference.roofline_full_logits(reference.load_roofline_model(path, rope_scaling=None), prompt)
    assert reference.relative_error(unscaled, scaled) > 1e-3


@pytest.mark.parametrize("family, config", [
    ("mistral", dict(sliding_window=24)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=24, max_window_layers=1)),
])
def test_sliding_window_models_are_exact_within_their_window(family, config, tmp_path, reference):
    """Without sliding-window attention, the context is capped at the window, inside which it is exact."""
    from roofline.loaders import open_model

    spec = reference.TinyModelSpec(family, dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                **config))
    reference.save_tiny_model(spec, str(tmp_path))
    assert open_model(str(tmp_path)).model_config().max_position_embeddings == 24
    prompt = reference.random_prompt(24, seed=5)
    ours = reference.roofline_full_logits(reference.load_roofline_model(str(tmp_path)), prompt)
    ref = reference.hf_full_logits(reference.load_hf_reference(str(tmp_path)), prompt)
    assert reference.relative_error(ours, ref) <= TOL
