"""The command line end to end on the default model."""

import json

import pytest

from roofline import __version__
from roofline.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_generate_chat_answers_paris(capsys):
    rc = main(["generate", "--model", "default", "--chat", "--prompt", "What is the capital of France?",
               "--temperature", "0", "--max-tokens", "16", "--kv-cache-memory", "64MiB"])
    assert rc == 0
    assert "Paris" in capsys.readouterr().out


def test_generate_json_with_logprobs(capsys):
    rc = main(["generate", "--prompt", "The sky is", "--temperature", "0", "--max-tokens", "4",
               "--logprobs", "2", "--json", "--kv-cache-memory", "64MiB"])
    assert rc == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["token_ids"]) == len(record["logprobs"]) == 4
    for tid, entry in zip(record["token_ids"], record["logprobs"]):
        chosen = entry[str(tid)]
        assert chosen["logprob"] <= 0
        assert chosen["rank"] == 1  # greedy picks the most likely token of the raw distribution
        assert 2 <= len(entry) <= 3


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "/no/such/model", "--prompt", "hi"], "not found"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "--temperature must be greater than or equal to 0"),
    (["generate", "--prompt", "hi", "--top-p", "0"], "--top-p must be greater than 0, got 0.0"),
    (["generate", "--prompt", "hi", "--max-tokens", "0"], "--max-tokens must be greater than or equal to 1, got 0"),
    (["generate", "--prompt", "hi", "--kernels", "nope"], "kernels must be one of"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err


# sampling flags get the server's limits, checked before the model loads
@pytest.mark.parametrize("argv, message", [
    (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
    (["--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["--temperature", "-0.5"], "--temperature must be greater than or equal to 0, got -0.5"),
    (["--temperature", "2.5"], "--temperature must be less than or equal to 2, got 2.5"),
    (["--top-p", "1.5"], "--top-p must be less than or equal to 1, got 1.5"),
    (["--top-p=-inf"], "--top-p must be a finite number, got -inf"),
    (["--max-tokens", "-1"], "--max-tokens must be greater than or equal to 1, got -1"),
    (["--top-k", "-2"], "--top-k must be greater than or equal to -1, got -2"),
    (["--sample-seed", str(2**64)], "--sample-seed must be less than"),
    (["--logprobs", "21"], "--logprobs must be less than or equal to 20, got 21"),
])
def test_bad_sampling_flags_are_one_line_and_exit_2(argv, message, capsys):
    assert main(["generate", "--prompt", "hi", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"roofline: error: {message}") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_chat_checks_sampling_flags_before_loading_the_model(capsys):
    assert main(["chat", "--temperature", "9"]) == 2
    assert capsys.readouterr().err == "roofline: error: --temperature must be less than or equal to 2, got 9.0\n"


def test_kernels_shows_the_choice_per_shape_and_bucket(capsys):
    assert main(["kernels", "--kv-cache-memory", "64MiB"]) == 0
    out = capsys.readouterr().out
    assert "machine:" in out and "torch" in out
    assert "int8 49152x576 head" in out  # the default model's tied head
    head = out[out.index("int8 49152x576 head"):]
    assert "*" in head  # a kernel was chosen for it
    assert "int4pack-bf16" in out  # the Q4_1 layers' kernel


def test_forced_kernel_generates(capsys):
    rc = main(["generate", "--prompt", "The sky is", "--temperature", "0", "--max-tokens", "4", "--json",
               "--kernels", "intmm-2digit", "--kv-cache-memory", "64MiB"])
    assert rc == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 4


def test_non_utf8_argument_is_one_line_error(capsys):
    # what Python makes of argv bytes that are not UTF-8 (b"caf\xe9 \xff"): lone surrogates
    prompt = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")
    assert main(["generate", "--prompt", prompt, "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "roofline: error: --prompt is not valid UTF-8 text"


def test_chat_commands_answer_and_never_reach_the_model(monkeypatch, capsys):
    """/reset says what it did; a mistyped /command is reported, not sent; //text sends "/text"."""
    import roofline.cli as cli
    from roofline import engine_args

    sent = []

    class Tokenizer:
        def apply_chat_template(self, history, add_generation_prompt):
            sent.append(history[-1]["content"])
            return "prompt"

        def encode(self, text, add_special_tokens):
            return [1]

    class Engine:
        def add_request(self, rid, ids, params):
            raise cli.RooflineError("stop here")  # the test only checks what was sent

    class FakeLLM:
        tokenizer, engine = Tokenizer(), Engine()

    lines = iter(["/reset", "/rest", "/nope with words", "//slash text", "/exit"])
    monkeypatch.setattr(engine_args, "make_llm", lambda args: FakeLLM())
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat"]) == 0
    err = capsys.readouterr().err
    assert "(history cleared)" in err
    assert "unknown command /rest" in err and "unknown command /nope:" in err
    assert sent == ["/slash text"]


def test_scheduler_flags_reach_the_engine(monkeypatch):
    import roofline.llm

    seen = {}

    class Stop(Exception):
        pass

    def fake_llm(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(roofline.llm, "LLM", fake_llm)
    with pytest.raises(Stop):
        main(["generate", "--prompt", "hi", "--max-num-seqs", "8", "--max-num-batched-tokens", "96",
              "--max-decode-stall-ms", "none"])
    assert (seen["max_num_seqs"], seen["max_num_batched_tokens"], seen["max_decode_stall_ms"]) == (8, 96, None)
    with pytest.raises(Stop):
        main(["generate", "--prompt", "hi", "--max-decode-stall-ms", "40"])
    assert seen["max_decode_stall_ms"] == 40.0


@pytest.mark.parametrize("argv", [["--max-num-seqs", "0"], ["--max-num-batched-tokens", "-1"]])
def test_bad_scheduler_flags_are_one_line_and_exit_2(argv, capsys):
    assert main(["generate", "--prompt", "hi", "--kv-cache-memory", "16MiB", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("roofline: error: ") and err.count("\n") == 1 and "must be >= 1" in err, err


def test_a_bad_stall_value_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "hi", "--max-decode-stall-ms", "-5"])
    assert exc.value.code == 2 and "positive number of milliseconds" in capsys.readouterr().err
