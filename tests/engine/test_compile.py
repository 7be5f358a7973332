"""The compiled decode step: padding to batch buckets, and the same tokens and logprobs as eager in fp32."""

from __future__ import annotations

import types

import pytest
import torch

from roofline.engine.input_batch import PersistentBatch
from roofline.engine import model_runner
from roofline.engine.model_runner import decode_buckets
from roofline.engine.scheduler import CachedRequestData, NewRequestData, SchedulerOutput
from roofline.llm import LLM
from roofline.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)


def test_decode_buckets_are_powers_of_two_capped_by_max_num_seqs():
    assert decode_buckets(1) == (1,)
    assert decode_buckets(6) == (1, 2, 4, 6)
    assert decode_buckets(64) == (1, 2, 4, 8, 16, 32, 64)


def _decode_step(batch: PersistentBatch, lengths: list[int]) -> SchedulerOutput:
    """Hand `batch` one request per length, each decoding after a cached context of that length."""
    out = SchedulerOutput([])
    for i, n in enumerate(lengths):
        blocks = list(range(10 * i, 10 * i + -(-(n + 1) // 4)))
        out.new_requests.append(NewRequestData(f"r{i}", list(range(n + 1)), n, SamplingParams(), None, blocks, n, 0))
        out.num_scheduled_tokens[f"r{i}"] = 1
    batch.update(out)
    return out


def test_a_padded_decode_batch_writes_its_padding_into_the_scratch_block():
    batch = PersistentBatch(block_size=4, max_blocks_per_seq=8, max_num_seqs=4, device=torch.device("cpu"),
                            scratch_block=99)
    out = _decode_step(batch, [5, 2, 3])
    plain = batch.prepare(out)
    padded = batch.prepare(out, pad_to=4)
    assert padded.input_ids.shape == (4,) and padded.positions.tolist()[:3] == plain.positions.tolist()
    assert padded.attn.slot_mapping.tolist() == [*plain.attn.slot_mapping.tolist(), 99 * 4]
    assert padded.attn.num_decode_tokens == 4
    table, mask = padded.attn.decode_block_table, padded.attn.decode_mask
    assert table.shape == (4, 2) and table[3].tolist() == [99, 99]  # as wide as the longest context (6 tokens)
    assert mask.shape == (4, 1, 1, 8) and mask[3, 0, 0].tolist() == [True] + [False] * 7
    assert torch.equal(mask[:3], plain.attn.decode_mask)
    assert [r.row for r in padded.logits_rows] == [r.row for r in plain.logits_rows] == [0, 1, 2]
    with pytest.raises(ValueError):
        batch.prepare(out, pad_to=2)


def test_a_padded_table_is_at_least_two_blocks_wide():
    batch = PersistentBatch(block_size=16, max_blocks_per_seq=4, max_num_seqs=2, device=torch.device("cpu"),
                            scratch_block=7)
    out = _decode_step(batch, [3])
    assert batch.prepare(out).attn.decode_block_table.shape == (1, 1)
    assert batch.prepare(out, pad_to=1).attn.decode_block_table.shape == (1, 2)  # one width, one graph
    out2 = SchedulerOutput([], cached_requests=[CachedRequestData("r0", [], 3)], num_scheduled_tokens={"r0": 1})
    batch.update(out2)
    assert batch.prepare(out2, pad_to=2).attn.decode_block_table.tolist() == [[0, 0], [7, 7]]


def test_compiled_decode_gives_eager_tokens_and_logprobs_in_fp32(tiny_model_dirs, monkeypatch):
    path = tiny_model_dirs["llama3-rope-scaling-gqa4"]
    kwargs = dict(dtype="float32", kv_cache_memory=8 << 20, max_num_seqs=4, max_model_len=128)
    # one bucket (one compile, ~20 s on 2 cores): one sequence and then three of different lengths,
    # every decode step padded to 4 rows
    monkeypatch.setattr(model_runner, "DECODE_BUCKETS", (4,))
    prompts = [[5, 6, 7, 8, 9] * 3, [11, 12, 13] * 7, [20, 21] * 9]
    eager = LLM(path, **kwargs)
    compiled = LLM(path, compile=True, **kwargs)
    assert compiled.engine.runner.decode_buckets == (4,)
    for batch in (prompts[:1], prompts):
        want = eager.generate(batch, GREEDY)
        got = compiled.generate(batch, GREEDY)
        for w, g in zip(want, got):
            assert g.outputs[0].token_ids == w.outputs[0].token_ids
            for lw, lg in zip(w.outputs[0].logprobs, g.outputs[0].logprobs):
                assert lw.keys() == lg.keys()
                for tid in lw:
                    assert abs(lw[tid].logprob - lg[tid].logprob) <= 1e-5
    assert compiled.engine.kv.num_free_blocks == compiled.engine.kv.num_blocks
    assert LLM(path, compile=True, enforce_eager=True, **kwargs).engine.runner.compiled_forward is None


def test_every_command_takes_compile_and_enforce_eager(monkeypatch):
    import roofline.cli as cli
    from roofline import engine_args
    import roofline.llm

    seen = {}
    def fake_llm(**kw):
        seen.update(kw)
        return types.SimpleNamespace(engine=types.SimpleNamespace(runner=types.SimpleNamespace(offload_plan=None)))

    monkeypatch.setattr(roofline.llm, "LLM", fake_llm)
    args = cli.build_parser().parse_args(["generate", "--prompt", "hi", "--compile", "--enforce-eager"])
    engine_args.make_llm(args)
    assert seen["compile"] is True and seen["enforce_eager"] is True
    args = cli.build_parser().parse_args(["generate", "--prompt", "hi"])
    engine_args.make_llm(args)
    assert seen["compile"] is False and seen["enforce_eager"] is False
