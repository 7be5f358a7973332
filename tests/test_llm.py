"""The LLM API and the `generate` command: results, and bad input turned into clear ValueErrors / exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import roofline.cli as cli
from roofline import engine_args
from roofline.errors import ContextOverflowError, InvalidRequestError, ModelLoadError
from roofline.llm import LLM
from roofline.sampling_params import SamplingParams

MAX_MODEL_LEN = 128
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("default", kv_cache_memory=16 << 20, max_model_len=MAX_MODEL_LEN)


def assert_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_generate_one_prompt_or_many(llm: LLM):
    one = llm.generate("The capital of France is", GREEDY)
    assert len(one) == 1 and len(one[0].outputs) == 1
    out = one[0].outputs[0]
    assert len(out.token_ids) == 4 and out.text and out.finish_reason == "length"
    many = llm.generate(["The capital of France is", "Hi"], GREEDY)
    assert [o.prompt for o in many] == ["The capital of France is", "Hi"]
    assert many[0].outputs[0].token_ids == out.token_ids
    ids = llm.tokenizer.encode("The capital of France is")
    by_ids = llm.generate(ids, GREEDY)[0]
    assert by_ids.prompt is None and by_ids.prompt_token_ids == ids
    assert by_ids.outputs[0].token_ids == out.token_ids
    assert_idle(llm)


def test_generate_with_one_params_per_prompt(llm: LLM):
    outs = llm.generate(["Hi", "Hello"], [GREEDY, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)])
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 2]
    with pytest.raises(InvalidRequestError, match="2 prompts but 1 sampling params"):
        llm.generate(["Hi", "Hello"], [GREEDY])


def test_chat_applies_the_template(llm: LLM):
    out = llm.chat([{"role": "user", "content": "Say hi."}], GREEDY)[0]
    assert "Say hi." in out.prompt and out.prompt != "Say hi."
    assert len(out.outputs[0].token_ids) == 4
    assert_idle(llm)


@pytest.mark.parametrize("prompt, message", [
    ("", "prompt is empty"),
    ([], "no prompts given"),
    ([[]], "prompt is empty"),
    ([10**9], "token ids must be integers in"),
])
def test_bad_prompts_raise_invalid_request(llm: LLM, prompt, message):
    with pytest.raises(InvalidRequestError, match=message) as err:
        llm.generate(prompt, GREEDY)
    assert isinstance(err.value, ValueError)
    assert_idle(llm)


def test_prompt_longer_than_the_context_overflows(llm: LLM):
    with pytest.raises(ContextOverflowError, match=f"context limit is {MAX_MODEL_LEN}") as err:
        llm.generate("word " * 200, GREEDY)
    assert isinstance(err.value, ValueError)
    with pytest.raises(ContextOverflowError, match="exceeds the context limit"):
        llm.generate("Hi", SamplingParams(max_tokens=MAX_MODEL_LEN))
    assert_idle(llm)


def test_a_bad_prompt_in_a_batch_leaves_no_request_behind(llm: LLM):
    with pytest.raises(ContextOverflowError):
        llm.generate(["Hi", "Hello", "word " * 200], GREEDY)
    assert_idle(llm)
    assert llm.generate("Hi", GREEDY)[0].outputs[0].token_ids  # still usable


@pytest.mark.parametrize("params, message", [
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(max_tokens=-3), "max_tokens must be an integer >= 1"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(n=0), "n must be an integer >= 1"),
    (dict(logprobs=21), "logprobs must be in"),
])
def test_bad_sampling_params_raise_value_errors(params, message):
    with pytest.raises(InvalidRequestError, match=message) as err:
        SamplingParams(**params)
    assert isinstance(err.value, ValueError)


def test_unknown_model_raises_a_clear_error():
    with pytest.raises(ModelLoadError, match="not found") as err:
        LLM("/no/such/model.gguf")
    assert isinstance(err.value, ValueError)
    assert "nothing is downloaded" in str(err.value)


# --- the generate command: one line on stderr, exit status 2 -----------------------------------------------

def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("extra, message", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "word " * 200], "context limit"),
    (["--prompt", "Hi", "--max-tokens", "0"], "--max-tokens must be greater than or equal to 1, got 0"),
    (["--prompt", "Hi", "--temperature", "-1"], "--temperature must be greater than or equal to 0"),
    (["--prompt", "Hi", "--top-p", "0"], "--top-p must be greater than 0"),
    (["--prompt", "Hi", "--top-p", "1.5"], "--top-p must be less than or equal to 1"),
])
def test_cli_bad_input_exits_2_with_one_line(llm: LLM, monkeypatch, capsys, extra, message):
    monkeypatch.setattr(engine_args, "make_llm", lambda args: llm)  # the shared engine stands in for loading
    code, out, err = run_cli(["generate", "--max-tokens", "4", *extra], capsys)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("roofline: error: ") and message in err


def test_cli_unknown_model_exits_2_with_one_line(capsys):
    code, out, err = run_cli(["generate", "--model", "/no/such/model.gguf", "--prompt", "Hi"], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "not found" in err


def test_cli_generate_prints_the_completion(llm: LLM, monkeypatch, capsys):
    monkeypatch.setattr(engine_args, "make_llm", lambda args: llm)
    code, out, err = run_cli(["generate", "--prompt", "The capital of France is", "--max-tokens", "4",
                              "--temperature", "0", "--json"], capsys)
    assert code == 0
    record = json.loads(out)
    expected = llm.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=4))[0]
    assert record["token_ids"] == expected.outputs[0].token_ids


def test_cli_as_a_process_exits_2_with_one_line():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "roofline.cli", "generate", "--prompt", "Hi", "--temperature", "-1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["roofline: error: --temperature must be greater than or equal to 0, got -1.0"]


def test_any_seed_in_range_works_for_every_sample(llm: LLM):
    # the n-th sample seeds with seed + n, which passed 2**64 - 1 (torch's largest) and raised
    params = SamplingParams(n=2, seed=2**64 - 1, max_tokens=3, temperature=1.0)
    first, second = (llm.generate("Hi", params)[0] for _ in range(2))
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in second.outputs]
