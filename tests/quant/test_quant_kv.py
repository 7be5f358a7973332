"""Int8 KV cache: the packed (values, scale) layout round-trips, and a model attends through it."""

from __future__ import annotations

import pytest
import torch

from roofline import LLM, SamplingParams
from roofline.config import QuantConfig
from roofline.errors import ConfigError
from roofline.quant.kv import KV_SCALE_BYTES, kv_slot_size, pack_kv, unpack_kv


def test_pack_unpack_within_half_a_step_per_token_and_head():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 64, generator=g) * torch.rand(7, 3, 1, generator=g) * 10
    x[2, 1] = 0.0
    packed = pack_kv(x)
    assert packed.dtype == torch.int8 and packed.shape == (7, 3, 64 + KV_SCALE_BYTES)
    back = unpack_kv(packed, torch.float32)
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    assert ((back - x).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(back[2, 1], torch.zeros(64))
    assert unpack_kv(packed, torch.bfloat16).dtype == torch.bfloat16


def test_packed_slots_survive_block_copies():
    # the engine copies and swaps whole blocks; values and scales must travel together
    x = torch.randn(16, 2, 32)
    cache = torch.zeros(4, 16, 2, kv_slot_size(32, torch.int8), dtype=torch.int8)
    cache[1] = pack_kv(x)
    cache[3].copy_(cache[1])
    assert torch.equal(unpack_kv(cache[3], torch.float32), unpack_kv(pack_kv(x), torch.float32))
    assert kv_slot_size(32, torch.float32) == 32


def test_kv_cache_dtype_is_validated():
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        QuantConfig(kv_cache_dtype="fp8")


def test_int8_kv_cache_engine_matches_fp32_cache(tiny_model_dirs):
    path = tiny_model_dirs["llama3-rope-scaling-gqa4"]
    kwargs = dict(dtype="float32", device="cpu", kv_cache_memory=2 << 20, max_num_batched_tokens=16,
                  quantization="none")
    ref, ours = LLM(path, **kwargs), LLM(path, kv_cache_dtype="int8", **kwargs)
    c = ref.engine.model_config
    assert ours.engine.runner.kv_bytes_per_token == 2 * c.num_layers * c.num_kv_heads * (c.head_dim + 4)
    assert ref.engine.runner.kv_bytes_per_token == 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4
    prompt = list(range(5, 69))  # 64 tokens in chunks of 16: later chunks attend through the cache
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0, logprobs=0)
    a, b = ref.generate([prompt], params)[0], ours.generate([prompt], params)[0]
    diffs = [abs(x[t].logprob - y[t].logprob) for x, y, t in
             zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], prompt[1:])]
    assert max(diffs[:15]) == 0.0  # the first chunk attends to its own fresh K/V, not the cache
    print(f"int8 KV: prompt logprob |diff| max {max(diffs):.3f}, mean {sum(diffs) / len(diffs):.4f}")
    assert max(diffs) < 0.2 and sum(diffs) / len(diffs) < 0.02
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
