"""Issue 17 F1 through the server: a group of n samples that together can never fit the KV cache
(each one alone does) is served to the end, and other requests go on being served."""

from __future__ import annotations

import json
import os

import pytest

from roofline import LLM

BLOCK_SIZE = 16
NUM_BLOCKS = 4  # 64 tokens of KV: one sample of 12 + 52 fits, four never fit together
PROMPT = list(range(10, 22))


def kv_bytes_per_token(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        c = json.load(f)
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * head_dim * 4  # fp32 K and V


@pytest.fixture(scope="module")
def small_cache_server(tiny_model_dirs, start_server):
    model = tiny_model_dirs["llama-5heads-mqa-tied"]
    llm = LLM(model, kv_cache_memory=NUM_BLOCKS * BLOCK_SIZE * kv_bytes_per_token(model), max_num_seqs=8)
    assert llm.engine.kv.num_blocks == NUM_BLOCKS and llm.engine.max_model_len == NUM_BLOCKS * BLOCK_SIZE
    with start_server(llm, model_name="tiny") as live:
        yield live


def test_n_samples_that_never_fit_together_finish_and_others_are_served(small_cache_server):
    max_tokens = NUM_BLOCKS * BLOCK_SIZE - len(PROMPT)
    with small_cache_server.client(timeout=60) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "n": 4,
                                            "ignore_eos": True, "temperature": 1.0, "seed": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [ch["finish_reason"] for ch in body["choices"]] == ["length"] * 4
        assert body["usage"]["completion_tokens"] == 4 * max_tokens
        assert small_cache_server.ctx.engine.engine.scheduler.num_preemptions > 0  # it did press on the cache
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 3})
        assert r.status_code == 200, r.text
        # a request that cannot fit even alone is refused up front, with the numbers
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens + 1})
        assert r.status_code == 400 and "64" in r.json()["error"]["message"], r.text
    small_cache_server.wait_idle()
