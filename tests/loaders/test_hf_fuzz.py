"""Seeded fuzz over config.json (issue 17 item 5): every mutation loads or is one RooflineError line, never
another exception, a hang or an absurd allocation — through the same LLM entry point the CLI uses."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time

import pytest

from roofline.errors import RooflineError
from roofline.llm import LLM

NUM_CASES = 60
JUNK = [None, True, False, 0, -1, 1.5, 1e12, 2**63, -(2**63), "", "7", "x" * 50, [], [1, 2], {}, {"a": 1}, float("nan")]
KEYS = ["hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "num_hidden_layers",
        "vocab_size", "max_position_embeddings", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
        "tie_word_embeddings", "architectures", "model_type", "eos_token_id", "bos_token_id", "hidden_act",
        "attention_bias", "torch_dtype"]


def mutations(config: dict, rng: random.Random):
    """(description, mutated config or raw text) pairs, seeded."""
    yield "not json", "{not json"
    yield "empty object", {}
    yield "a list", [config]
    for i in range(NUM_CASES):
        c = json.loads(json.dumps(config))
        kind = rng.choice(["drop", "junk", "junk2", "scale"])
        key = rng.choice(KEYS)
        if kind == "drop":
            c.pop(key, None)
        elif kind == "scale" and isinstance(c.get(key), int) and not isinstance(c.get(key), bool):
            c[key] = c[key] * rng.choice([0, 3, 1000, 10**6]) + rng.choice([0, 1, -1])
        else:
            c[key] = rng.choice(JUNK)
            if kind == "junk2":
                c[rng.choice(KEYS)] = rng.choice(JUNK)
        yield f"#{i} {kind} {key}", c


def _alarm(signum, frame):
    raise TimeoutError("a load took longer than 20 s")


def test_mutated_config_json_loads_or_fails_in_one_line(tiny_model_dirs, tmp_path):
    source = tiny_model_dirs["llama-5heads-mqa-tied"]
    with open(os.path.join(source, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    rng = random.Random(17)
    outcomes = {"loaded": 0, "refused": 0}
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for name, mutated in mutations(config, rng):
            path = tmp_path / "model"
            shutil.rmtree(path, ignore_errors=True)
            shutil.copytree(source, path)
            with open(path / "config.json", "w", encoding="utf-8") as f:
                f.write(mutated if isinstance(mutated, str) else json.dumps(mutated))
            signal.alarm(20)
            start = time.monotonic()
            try:
                LLM(str(path), kv_cache_memory=1 << 20, max_model_len=32)
                outcomes["loaded"] += 1
            except RooflineError as exc:
                message = str(exc)
                assert message and "\n" not in message, (name, message)
                outcomes["refused"] += 1
            except Exception as exc:  # noqa: BLE001 - the point of the test
                pytest.fail(f"{name}: {type(exc).__name__}: {exc}")
            finally:
                signal.alarm(0)
            assert time.monotonic() - start < 20, name
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcomes["refused"] > NUM_CASES // 3 and outcomes["loaded"] > 0, outcomes
