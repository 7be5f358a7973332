"""`roofline batch`: OpenAI batch lines in, OpenAI batch records out; bad lines become error records,
input is read lazily within a window, records are flushed as they finish, and a rerun resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import roofline.cli as cli
from roofline import engine_args
from roofline.batch import BatchJob, answered, parse_line, read_lines
from roofline.llm import LLM
from roofline.sampling_params import SamplingParams

MAX_MODEL_LEN = 128


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("default", kv_cache_memory=24 << 20, max_model_len=MAX_MODEL_LEN, max_num_seqs=8)


def completion(custom_id: str, prompt, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 3, "temperature": 0, **body}}


def chat(custom_id: str, content: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": content}],
                     "max_completion_tokens": 3, "temperature": 0, **body}}


def write_input(path, lines: list) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


def run_job(llm: LLM, input_path: str, output_path: str, window: int = 16):
    done_ids, done_lines = answered(output_path)
    with open(output_path, "a", encoding="utf-8") as out:
        job = BatchJob(llm.engine, out, "SmolLM2-135M-Instruct", window)
        return job.run(read_lines(input_path), done_ids, done_lines)


def read_records(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def by_id(records: list[dict]) -> dict[str, dict]:
    return {r["custom_id"]: r for r in records if r["error"] is None}


def assert_idle(llm: LLM) -> None:
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


# --- mapping of body fields ---------------------------------------------------------------------------------

def test_completion_fields_map_to_sampling_params(llm: LLM):
    job = parse_line(json.dumps(completion("a", "Hi", max_tokens=7, temperature=0.5, top_p=0.9, n=2,
                                           stop=["\n", "."], seed=42, logprobs=3, presence_penalty=0.5,
                                           frequency_penalty=-0.25)), llm.tokenizer, MAX_MODEL_LEN)
    p = job.params
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.stop, p.seed, p.logprobs) == (7, 0.5, 0.9, 2, ["\n", "."],
                                                                                       42, 3)
    assert (p.presence_penalty, p.frequency_penalty) == (0.5, -0.25)
    assert job.prompts == ["Hi"] and job.custom_id == "a"


def test_chat_fields_map_to_sampling_params(llm: LLM):
    line = chat("c", "Hi", max_tokens=9, max_completion_tokens=5, logprobs=True, top_logprobs=2, stop="END", seed=1)
    job = parse_line(json.dumps(line), llm.tokenizer, MAX_MODEL_LEN)
    assert job.params.max_tokens == 5  # max_completion_tokens wins
    assert (job.params.logprobs, job.params.stop, job.params.seed) == (2, ["END"], 1)
    expected = llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}]),
                                    add_special_tokens=False)
    assert job.prompts == [expected]
    legacy = parse_line(json.dumps(chat("d", "Hi", max_completion_tokens=None, max_tokens=4)), llm.tokenizer,
                        MAX_MODEL_LEN)
    assert legacy.params.max_tokens == 4
    assert parse_line(json.dumps(chat("e", "Hi", logprobs=False)), llm.tokenizer, MAX_MODEL_LEN).params.logprobs is None


# --- results --------------------------------------------------------------------------------------------------

def test_records_have_openai_shape_and_match_the_engine(llm: LLM, tmp_path):
    prompts = ["The capital of France is", "1, 2, 3,", "Once upon a time"]
    lines = [completion(f"p{i}", p, logprobs=2) for i, p in enumerate(prompts)] + [chat("chat", "Say hi.",
                                                                                        logprobs=True, top_logprobs=2)]
    summary = run_job(llm, write_input(tmp_path / "in.jsonl", lines), str(tmp_path / "out.jsonl"))
    assert (summary.num_done, summary.num_errors, summary.num_skipped) == (4, 0, 0)
    records = read_records(str(tmp_path / "out.jsonl"))
    assert sorted(r["custom_id"] for r in records) == ["chat", "p0", "p1", "p2"]
    greedy = SamplingParams(temperature=0.0, max_tokens=3)
    for record in records:
        assert set(record) == {"id", "custom_id", "response", "error"}
        assert record["id"].startswith("batch_req_") and record["error"] is None
        response = record["response"]
        assert response["status_code"] == 200 and response["request_id"]
        body = response["body"]
        assert body["model"] == "SmolLM2-135M-Instruct" and body["usage"]["completion_tokens"] == 3
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 3
        choice = body["choices"][0]
        assert choice["index"] == 0 and choice["finish_reason"] == "length"
        if record["custom_id"] == "chat":
            assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
            expected = llm.chat([{"role": "user", "content": "Say hi."}], greedy)[0].outputs[0]
            assert choice["message"] == {"role": "assistant", "content": expected.text, "refusal": None}
            content = choice["logprobs"]["content"]
            assert len(content) == 3 and all(len(c["top_logprobs"]) == 2 for c in content)
            assert "".join(c["token"] for c in content) == expected.text
        else:
            assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
            expected = llm.generate(prompts[int(record["custom_id"][1:])], greedy)[0].outputs[0]
            assert choice["text"] == expected.text
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == 3
            assert all(x <= 0 for x in lp["token_logprobs"])
    assert_idle(llm)


def test_several_prompts_n_samples_seed_and_echo(llm: LLM, tmp_path):
    line = completion("multi", ["One", "Two"], n=2, seed=5, temperature=0.9, echo=True, logprobs=0)
    run_job(llm, write_input(tmp_path / "in.jsonl", [line]), str(tmp_path / "a.jsonl"))
    run_job(llm, write_input(tmp_path / "in.jsonl", [line]), str(tmp_path / "b.jsonl"))
    first, second = (read_records(str(tmp_path / name))[0]["response"]["body"] for name in ("a.jsonl", "b.jsonl"))
    assert [c["index"] for c in first["choices"]] == [0, 1, 2, 3]
    assert [c["text"][:3] for c in first["choices"]] == ["One", "One", "Two", "Two"]
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in second["choices"]]  # seeded
    assert first["usage"]["completion_tokens"] == 12
    echo_tokens = first["choices"][0]["logprobs"]["tokens"]
    assert len(echo_tokens) == 1 + 3 and first["choices"][0]["logprobs"]["token_logprobs"][0] is None


def test_bad_lines_become_error_records_and_the_job_goes_on(llm: LLM, tmp_path):
    lines = [
        completion("ok1", "Hello"),
        "{not json",
        "[1, 2]",
        {"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}},
        {"custom_id": "url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        {"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}},
        completion("temp", "Hi", temperature=-1),
        completion("topp", "Hi", top_p=0),
        completion("n0", "Hi", n=0),
        completion("empty", ""),
        completion("long", "word " * 200),
        chat("tools", "Hi", tools=[{"type": "function", "function": {"name": "not a name"}}]),
        {"custom_id": "nomsg", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}},
        completion("ok1", "Hello again"),
        completion("ok2", "Goodbye"),
    ]
    summary = run_job(llm, write_input(tmp_path / "in.jsonl", lines), str(tmp_path / "out.jsonl"))
    records = read_records(str(tmp_path / "out.jsonl"))
    assert len(records) == len(lines) and (summary.num_done, summary.num_errors) == (2, len(lines) - 2)
    assert set(by_id(records)) == {"ok1", "ok2"}
    errors = [r for r in records if r["error"] is not None]
    assert all(r["response"] is None and set(r["error"]) == {"code", "message"} for r in errors)
    codes = {(r["custom_id"], r["error"]["code"]) for r in errors}
    assert {("url", "invalid_url"), ("get", "invalid_method"), ("long", "context_length_exceeded"),
            ("ok1", "duplicate_custom_id"), (None, "invalid_json"), (None, "missing_custom_id")} <= codes
    messages = {r["custom_id"]: r["error"]["message"] for r in errors if r["custom_id"]}
    assert messages["temp"].startswith("line 7: ") and "temperature" in messages["temp"]
    assert "top_p" in messages["topp"] and "n" in messages["n0"]
    assert "context limit" in messages["long"] and "tools" in messages["tools"]
    assert sum(r["custom_id"] is None for r in errors) == 3  # bad JSON, not an object, no custom_id
    assert_idle(llm)


def test_structured_outputs_and_tool_calls_run_as_the_server_runs_them(tmp_path):
    """The batch job shares the server's translation: a JSON schema holds, a required tool call parses."""
    pytest.importorskip("xgrammar")
    llm = LLM("default", kv_cache_memory=24 << 20, max_model_len=320, max_num_seqs=2)  # room for the tools prompt
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
              "additionalProperties": False}
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
        "additionalProperties": False}}}
    lines = [chat("json", "Name a city.", max_completion_tokens=40,
                  response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}),
             chat("tool", "Weather in Paris?", max_completion_tokens=60, tools=[weather], tool_choice="required")]
    summary = run_job(llm, write_input(tmp_path / "in.jsonl", lines), str(tmp_path / "out.jsonl"))
    assert (summary.num_done, summary.num_errors) == (2, 0)
    records = by_id(read_records(str(tmp_path / "out.jsonl")))
    json_choice = records["json"]["response"]["body"]["choices"][0]
    if json_choice["finish_reason"] == "stop":  # a cut-off (length) answer is a valid prefix, not a document
        assert set(json.loads(json_choice["message"]["content"])) == {"city"}
    tool_choice = records["tool"]["response"]["body"]["choices"][0]
    assert tool_choice["finish_reason"] == "tool_calls"
    [call] = tool_choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and set(json.loads(call["function"]["arguments"])) == {"city"}
    assert_idle(llm)


# --- streaming, bounded memory, resume ----------------------------------------------------------------------

def test_input_is_read_lazily_within_the_window_and_records_are_flushed(llm: LLM, tmp_path, monkeypatch):
    n, window = 12, 3
    input_path = write_input(tmp_path / "in.jsonl", [completion(f"r{i}", f"Number {i}:", max_tokens=2)
                                                     for i in range(n)])
    output_path = str(tmp_path / "out.jsonl")
    consumed = []
    batch_sizes = []
    step = llm.engine.step

    def spy_step():
        batch_sizes.append(len(llm.engine.scheduler.running) + len(llm.engine.scheduler.waiting))
        return step()

    monkeypatch.setattr(llm.engine, "step", spy_step)

    def lines():
        for item in read_lines(input_path):
            with open(output_path, encoding="utf-8") as f:
                on_disk = sum(1 for _ in f)
            consumed.append((item[0], on_disk))
            yield item

    with open(output_path, "a", encoding="utf-8") as out:
        job = BatchJob(llm.engine, out, "m", window)
        job.run(lines(), set(), set())
    assert len(read_records(output_path)) == n
    assert max(batch_sizes) == window  # the window batches together, and never more
    # when line k is read, at least k - window - 1 records are already on disk (written and flushed)
    assert all(on_disk >= number - window - 1 for number, on_disk in consumed)
    assert consumed[-1][1] >= n - window - 1
    assert_idle(llm)


def test_resume_skips_answered_ids_and_redoes_a_torn_line(llm: LLM, tmp_path):
    lines = [completion(f"r{i}", f"Item {i}", max_tokens=2) for i in range(6)] + ["oops"]
    input_path = write_input(tmp_path / "in.jsonl", lines)
    full = str(tmp_path / "full.jsonl")
    run_job(llm, input_path, full)
    with open(full, encoding="utf-8") as f:
        text = f.readlines()
    partial = str(tmp_path / "partial.jsonl")
    with open(partial, "w", encoding="utf-8") as f:  # three records, then a fourth cut off mid-write
        f.writelines(text[:3])
        f.write(text[3][:40])
    summary = run_job(llm, input_path, partial)
    assert summary.num_skipped == 3 and summary.num_done + summary.num_errors == 4
    records = read_records(partial)  # the torn line is gone: every line parses
    ids = [r["custom_id"] for r in records]
    assert sorted(i for i in ids if i) == [f"r{i}" for i in range(6)] and ids.count(None) == 1
    again = run_job(llm, input_path, partial)
    assert (again.num_done, again.num_errors, again.num_skipped) == (0, 0, 7)
    assert len(read_records(partial)) == 7


def test_resume_after_a_duplicate_was_reported_before_its_original_finished(llm: LLM, tmp_path):
    lines = [completion("same", "First", max_tokens=2), completion("same", "Second", max_tokens=2)]
    input_path = write_input(tmp_path / "in.jsonl", lines)
    output_path = str(tmp_path / "out.jsonl")
    run_job(llm, input_path, output_path)
    records = read_records(output_path)
    assert [r["error"]["code"] if r["error"] else None for r in records] == ["duplicate_custom_id", None]
    with open(output_path, "w", encoding="utf-8") as f:  # stopped after the duplicate's error was written
        f.write(json.dumps(records[0]) + "\n")
    summary = run_job(llm, input_path, output_path)
    assert (summary.num_done, summary.num_errors, summary.num_skipped) == (1, 0, 1)
    assert [r["error"] is None for r in read_records(output_path)] == [False, True]


def test_an_interrupted_job_frees_the_engine(llm: LLM, tmp_path, monkeypatch):
    input_path = write_input(tmp_path / "in.jsonl", [completion(f"r{i}", "Hi", max_tokens=20) for i in range(4)])
    calls = []

    def interrupted():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return []

    monkeypatch.setattr(llm.engine, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_job(llm, input_path, str(tmp_path / "out.jsonl"))
    assert_idle(llm)


# --- the command ----------------------------------------------------------------------------------------------

def test_cli_batch_runs_with_a_progress_bar(llm: LLM, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(engine_args, "make_llm", lambda args: llm)
    input_path = write_input(tmp_path / "in.jsonl", [completion("a", "Hi"), chat("b", "Hello"), "bad"])
    output_path = str(tmp_path / "out.jsonl")
    assert cli.main(["batch", input_path, output_path]) == 0
    err = capsys.readouterr().err
    assert "tok/s" in err and "3/3" in err  # tqdm: requests done and the token rate
    assert "2 done, 1 errors, 0 skipped" in err
    assert cli.main(["batch", input_path, output_path, "--no-progress"]) == 0
    assert "0 done, 0 errors, 3 skipped" in capsys.readouterr().err
    assert len(read_records(output_path)) == 3


def test_cli_batch_missing_input_exits_2_with_one_line(tmp_path, capsys):
    code = cli.main(["batch", str(tmp_path / "nope.jsonl"), str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not found" in err
    assert not os.path.exists(tmp_path / "out.jsonl")


def test_cli_batch_as_a_process(tmp_path):
    input_path = write_input(tmp_path / "in.jsonl", [completion("a", "The capital of France is")])
    output_path = str(tmp_path / "out.jsonl")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "roofline.cli", "batch", input_path, output_path,
                           "--max-model-len", "64", "--kv-cache-memory", "8MiB", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    [record] = read_records(output_path)
    assert record["custom_id"] == "a" and record["response"]["body"]["choices"][0]["text"]
    assert proc.stderr.strip().splitlines()[-1].startswith("roofline batch: 1 done")


def test_n_samples_that_never_fit_the_cache_together_finish(tiny_model_dirs, tmp_path):
    # issue 17 F1 in batch: 4 KV blocks hold one sample of 12 + 52 tokens, never all four together;
    # the job used to stall for ever with every block held by waiting samples
    model = tiny_model_dirs["llama-5heads-mqa-tied"]
    with open(os.path.join(model, "config.json"), encoding="utf-8") as f:
        c = json.load(f)
    kv_bytes_per_token = c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * 16 * 4  # head_dim 16, fp32
    small = LLM(model, kv_cache_memory=4 * 16 * kv_bytes_per_token, max_num_seqs=8)
    assert small.engine.kv.num_blocks == 4
    lines = [{"custom_id": "group", "method": "POST", "url": "/v1/completions",
              "body": {"model": "tiny", "prompt": list(range(10, 22)), "max_tokens": 52, "n": 4, "ignore_eos": True,
                       "temperature": 1.0, "seed": 3}},
             {"custom_id": "small", "method": "POST", "url": "/v1/completions",
              "body": {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 3}},
             {"custom_id": "too-long", "method": "POST", "url": "/v1/completions",
              "body": {"model": "tiny", "prompt": list(range(10, 22)), "max_tokens": 53}}]
    out_path = str(tmp_path / "out.jsonl")
    with open(out_path, "a", encoding="utf-8") as out:
        for part, counts in ((lines[:1], (1, 0)), (lines[1:], (1, 1))):  # the group alone: the case that stalled
            summary = BatchJob(small.engine, out, "tiny", 16).run(read_lines(write_input(tmp_path / "in.jsonl", part)),
                                                                 set(), set())
            assert (summary.num_done, summary.num_errors) == counts
    records = {r["custom_id"]: r for r in read_records(out_path)}
    body = records["group"]["response"]["body"]
    assert [ch["finish_reason"] for ch in body["choices"]] == ["length"] * 4
    assert body["usage"]["completion_tokens"] == 4 * 52
    assert small.engine.scheduler.num_preemptions > 0
    assert "64" in records["too-long"]["error"]["message"]
    assert_idle(small)
