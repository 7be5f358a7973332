"""End to end on the default model: batching, chunking, preemption and prefix caching never change output.

A batch of varied prompts must give exactly the greedy tokens, and logprobs within 1e-4, of each prompt
run alone; the same under forced preemption (recompute and swap) and with the prefix cache on. Every KV
block is free once the engine is idle.
"""

from __future__ import annotations

import gc
import tracemalloc

import psutil
import pytest
import torch

from roofline.config import ModelConfig
from roofline.engine.model_runner import ModelRunner
from roofline.llm import LLM
from roofline.outputs import RequestOutput
from roofline.sampling_params import SamplingParams

MAX_MODEL_LEN = 256
BLOCK_BYTES = 16 * 46080  # one 16-token block of the default model's fp32 K/V
CHUNK = 64  # max_num_batched_tokens: prompts longer than this are prefilled in chunks
# fp32 weights: the low-bit kernels take bf16 activations, whose rounding turns the 1e-6 differences
# between chunkings of fp32 attention into logprob differences of up to ~0.2 (docs/quantization.md)
QUANTIZATION = "none"

FOX = "The quick brown fox jumps over the lazy dog. "
PROMPTS = [
    "Hi",                                                          # 1 token
    "Write a haiku about the sea.",                                # 8 tokens
    FOX * 4,                                                       # 41 tokens
    "In 1905, Albert Einstein published four papers that " * 10,   # 131 tokens: chunked
    "1, 2, 3, 4, 5,",
    FOX * 20,                                                      # 201 tokens: chunked
]
# slices of this passage (as token ids) make four ~60-token prompts with no prefix in common; their decodes
# cross a block boundary at about the same time, which is what forces preemption of running requests
PASSAGE = ("Photosynthesis is the process by which green plants and some other organisms use sunlight to synthesize "
           "foods from carbon dioxide and water. It generally involves the green pigment chlorophyll and generates "
           "oxygen as a byproduct. The history of the printing press begins in the fifteenth century, when Johannes "
           "Gutenberg combined movable metal type with oil-based inks and a wooden press. Rivers carve valleys over "
           "millions of years, carrying sediment from mountains to the sea, where it settles into deltas and plains. "
           "A well-written function does one thing, has a clear name, and is easy to test in isolation.")
SLICES = [(0, 62), (17, 61), (34, 63), (51, 60)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def llm() -> LLM:
    """Ample KV cache, prefix cache off: the reference engine."""
    return LLM("default", kv_cache_memory=64 << 20, max_model_len=MAX_MODEL_LEN, max_num_seqs=16,
               max_num_batched_tokens=CHUNK, enable_prefix_caching=False, quantization=QUANTIZATION)


@pytest.fixture(scope="module")
def small_llm() -> LLM:
    """A KV cache of 17 blocks (272 tokens): barely one full-length sequence, so batches must preempt."""
    return LLM("default", kv_cache_memory=17 * BLOCK_BYTES, max_model_len=MAX_MODEL_LEN, max_num_seqs=16,
               max_num_batched_tokens=CHUNK, enable_prefix_caching=True, quantization=QUANTIZATION)


@pytest.fixture(scope="module")
def prompts(llm: LLM) -> list[str | list[int]]:
    """The text prompts, then the token-id slices of the passage."""
    ids = llm.tokenizer.encode(PASSAGE)
    return PROMPTS + [ids[start:start + length] for start, length in SLICES]


@pytest.fixture(scope="module")
def alone(llm: LLM, prompts) -> list[RequestOutput]:
    """Each prompt run on its own."""
    return [llm.generate(p, GREEDY)[0] for p in prompts]


def assert_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert not engine.kv.block_tables and not engine.kv.swap_tables


def assert_same(outputs: list[RequestOutput], expected: list[RequestOutput]) -> None:
    """Identical token ids; logprobs of every reported entry within 1e-4."""
    for out, ref in zip(outputs, expected, strict=True):
        a, b = out.outputs[0], ref.outputs[0]
        assert a.token_ids == b.token_ids, f"prompt {out.prompt_token_ids[:8]}...: tokens differ"
        assert a.text == b.text
        assert len(a.logprobs) == len(b.logprobs) == len(a.token_ids)
        for entry, ref_entry in zip(a.logprobs, b.logprobs):
            assert entry.keys() == ref_entry.keys()
            for tid, lp in entry.items():
                assert lp.logprob == pytest.approx(ref_entry[tid].logprob, abs=1e-4)
                assert lp.rank == ref_entry[tid].rank


def record_steps(llm: LLM, monkeypatch) -> list:
    """Record every SchedulerOutput the engine runs."""
    plans = []
    schedule = llm.engine.scheduler.schedule

    def spy():
        plans.append(schedule())
        return plans[-1]

    monkeypatch.setattr(llm.engine.scheduler, "schedule", spy)
    return plans


def test_prompts_cover_chunking(llm: LLM, prompts):
    lengths = [len(llm.tokenizer.encode(p)) if isinstance(p, str) else len(p) for p in prompts]
    assert min(lengths) == 1 and sum(n > CHUNK for n in lengths) == 2
    assert lengths[-4:] == [length for _, length in SLICES]


def test_batch_equals_each_prompt_alone(llm: LLM, prompts, alone, monkeypatch):
    plans = record_steps(llm, monkeypatch)
    outputs = llm.generate(prompts, GREEDY)
    assert_same(outputs, alone)
    assert max(len(p.scheduled) for p in plans) >= 6  # they ran together, not one after another
    # some step mixed decode tokens with a prefill chunk, and no step went over the budget
    assert any(any(s.num_new_tokens == 1 for s in p.scheduled) and any(s.num_new_tokens > 1 for s in p.scheduled)
               for p in plans)
    assert all(p.num_batched_tokens <= CHUNK for p in plans)
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outputs)
    assert_idle(llm)


def test_batch_with_mixed_params_and_prompt_logprobs(llm: LLM, prompts, alone):
    echo = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    params = [GREEDY] * len(prompts)
    params[2] = echo
    reference = llm.generate(prompts[2], echo)[0]
    outputs = llm.generate(prompts, params)
    assert_same(outputs, alone)
    got, want = outputs[2].prompt_logprobs, reference.prompt_logprobs
    assert got[0] is None and len(got) == len(outputs[2].prompt_token_ids) == len(want)
    for entry, ref_entry in zip(got[1:], want[1:]):
        assert entry.keys() == ref_entry.keys()
        for tid, lp in entry.items():
            assert lp.logprob == pytest.approx(ref_entry[tid].logprob, abs=1e-4)
    assert_idle(llm)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_does_not_change_output(small_llm: LLM, prompts, alone, mode, monkeypatch):
    engine = small_llm.engine
    # the engine reads its preemption mode per decision, so one engine serves both modes
    monkeypatch.setattr(engine.config.scheduler, "preemption_mode", mode)
    preemptions, swaps = engine.scheduler.num_preemptions, engine.scheduler.num_swaps
    victims = []
    preempt = engine.scheduler._preempt

    def spy(request, out):
        victims.append((request.num_prompt_tokens, request.num_output_tokens))
        preempt(request, out)

    monkeypatch.setattr(engine.scheduler, "_preempt", spy)
    outputs = small_llm.generate(prompts, GREEDY)
    assert engine.scheduler.num_preemptions > preemptions
    assert any(num_output > 0 for _, num_output in victims)  # a decoding request lost its blocks
    assert any(num_prompt > CHUNK for num_prompt, _ in victims)  # and so did one in chunked prefill
    if mode == "swap":
        assert engine.scheduler.num_swaps > swaps
    else:
        assert engine.scheduler.num_swaps == swaps
    assert_same(outputs, alone)
    assert_idle(small_llm)


SYSTEM = "You are a careful assistant. Answer briefly and precisely, and never invent facts. " * 3


def test_prefix_cache_on_and_off_give_identical_output(llm: LLM, small_llm: LLM):
    prompts = [SYSTEM + q for q in ["Name a color.", "Name a fruit.", "Count to three.", "Say hello."]]
    assert len(llm.tokenizer.encode(SYSTEM)) >= 48  # at least three shared full blocks
    off = llm.generate(prompts, GREEDY)
    stats = small_llm.engine.kv.stats
    queried, hits = stats.queried_tokens, stats.hit_tokens
    on = small_llm.generate(prompts, GREEDY)
    assert_same(on, off)
    assert stats.hit_tokens - hits >= 3 * 48  # every prompt after the first reused the prefix
    assert (stats.hit_tokens - hits) / (stats.queried_tokens - queried) > 0.3
    assert sum(o.num_cached_tokens > 0 for o in on) >= 3
    assert all(o.num_cached_tokens == 0 for o in off)
    again = small_llm.generate(prompts[0], GREEDY)  # a repeat hits its own cached blocks
    assert again[0].num_cached_tokens >= 48
    assert_same(again, off[:1])
    assert_idle(llm)
    assert_idle(small_llm)


def test_n_samples_with_seed_are_reproducible_and_fork_correctly(llm: LLM):
    params = SamplingParams(n=3, seed=11, temperature=0.9, max_tokens=8, ignore_eos=True, logprobs=0)
    prompt = PROMPTS[2]
    first = llm.generate(prompt, params)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in first.outputs)
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1
    second = llm.generate(prompt, params)[0]
    assert [c.token_ids for c in second.outputs] == [c.token_ids for c in first.outputs]
    # sample i draws from seed + i: alone it gives the same tokens as when forked off the shared prompt
    for i, completion in enumerate(first.outputs):
        single = llm.generate(prompt, SamplingParams(seed=11 + i, temperature=0.9, max_tokens=8, ignore_eos=True))
        assert single[0].outputs[0].token_ids == completion.token_ids
    other = llm.generate(prompt, SamplingParams(n=3, seed=12345, temperature=0.9, max_tokens=8, ignore_eos=True))
    assert [c.token_ids for c in other[0].outputs] != [c.token_ids for c in first.outputs]
    assert_idle(llm)


def test_abort_frees_blocks_at_once(llm: LLM):
    engine = llm.engine
    engine.add_request("a", PROMPTS[5], GREEDY)
    engine.add_request("b", PROMPTS[2], SamplingParams(n=3, seed=1, max_tokens=8))
    engine.add_request("c", PROMPTS[1], GREEDY)
    for _ in range(4):
        engine.step()
    assert engine.kv.num_free_blocks < engine.kv.num_blocks
    engine.abort(["a", "b"])
    assert "a" not in engine.groups and "b" not in engine.groups
    assert engine.kv.num_free_blocks == engine.kv.num_blocks - len(engine.kv.block_tables["c"])
    engine.abort("c")
    engine.abort("never-added")  # unknown ids are ignored
    assert_idle(llm)
    assert engine.step() == []  # an idle step does nothing


def test_finished_requests_free_their_blocks(llm: LLM):
    engine = llm.engine
    engine.add_request("x", PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    engine.add_request("y", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    finished = []
    while "x" not in finished:
        finished += [o.request_id for o in engine.step() if o.finished]
    assert "x#0" not in engine.kv.block_tables and "x" not in engine.kv.block_tables
    engine.abort("y")
    assert_idle(llm)


def test_a_thousand_queued_requests_stay_within_bookkeeping_memory(llm: LLM):
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=4)
    prompt = llm.tokenizer.encode(FOX * 5)  # 51 tokens, token ids so tokenizing is not measured
    gc.collect()
    process = psutil.Process()
    rss_before = process.memory_info().rss
    tracemalloc.start()
    try:
        for i in range(1000):
            engine.add_request(f"q{i}", prompt, params)
        traced, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_queued = process.memory_info().rss - rss_before
    assert engine.kv.num_free_blocks == engine.kv.num_blocks  # queued requests hold no KV
    assert traced < 20 << 20, f"1000 queued requests take {traced >> 20} MiB of Python objects"
    assert rss_queued < 50 << 20, f"1000 queued requests grew RSS by {rss_queued >> 20} MiB"
    for _ in range(3):
        engine.step()
    assert len(engine.scheduler.running) <= 16
    kv_bytes = engine.kv.num_blocks * BLOCK_BYTES
    assert process.memory_info().rss - rss_before < kv_bytes + (50 << 20)
    engine.abort([f"q{i}" for i in range(1000)])
    assert_idle(llm)


def test_fresh_kv_cache_and_swap_space_hold_no_garbage(monkeypatch):
    """Attention reads whole blocks and masks unwritten slots, but a masked NaN still poisons its output."""
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    config = ModelConfig("llama", vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=4, max_position_embeddings=64)
    runner = ModelRunner(torch.nn.Identity(), config, torch.device("cpu"), torch.float32)
    runner.allocate_kv_cache(num_blocks=4, block_size=16, num_swap_blocks=3, max_model_len=64, max_num_seqs=4)
    monkeypatch.undo()
    assert len(runner.kv_caches) == len(runner.swap_caches) == 2
    for k, v in runner.kv_caches + runner.swap_caches:
        assert torch.isfinite(k).all() and torch.isfinite(v).all()


def test_outputs_report_queue_time(llm: LLM):
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=2)
    engine.add_request("qt", [11, 12, 13], params)
    outs = []
    while engine.has_unfinished_requests():
        outs.extend(engine.step())
    assert outs and all(o.queue_time is not None and o.queue_time >= 0 for o in outs)


def test_an_echo_request_never_stops_a_running_stream(llm: LLM, monkeypatch):
    # issue 17 F2: prompt chunks are cut to the measured cost of max_decode_stall_ms while a stream decodes
    engine = llm.engine
    monkeypatch.setattr(engine.config.scheduler, "max_decode_stall_ms", 1.0)  # any prompt token costs more
    monkeypatch.setattr(engine.scheduler, "prefill_chunk_limit", None)
    plans = record_steps(llm, monkeypatch)
    echo = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    expected = llm.generate(PROMPTS[5], echo)[0].prompt_logprobs
    engine.add_request("stream", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
    while not engine.step():
        pass
    engine.add_request("echo", PROMPTS[5], echo)
    echo_out = None
    while echo_out is None:
        outputs = {o.request_id: o for o in engine.step()}
        assert "stream" in outputs, "the stream went a step without a token"
        echo_out = outputs.get("echo")
    chunks = [p.num_scheduled_tokens["echo"] for p in plans if "echo" in p.num_scheduled_tokens]
    assert len(chunks) > 201 // CHUNK + 1 and max(chunks[1:]) <= 16  # the first step measured the cost
    assert len(echo_out.prompt_logprobs) == len(expected)
    for got, ref in zip(echo_out.prompt_logprobs[1:], expected[1:]):
        assert got.keys() == ref.keys()
        for tid in got:
            assert got[tid].logprob == pytest.approx(ref[tid].logprob, abs=1e-4)
    engine.abort("stream")
    assert_idle(llm)
