"""`roofline batch INPUT.jsonl OUTPUT.jsonl`: an OpenAI Batch API job, run offline through the engine.

Each input line is an OpenAI batch request (`custom_id`, `method`, `url`, `body`); each output line is
OpenAI's batch output record, with the same completion / chat.completion body the server returns, or
an error record. The input is read lazily and at most `window` sequences are in the engine at a time,
so memory stays bounded however long the file is; records are appended and flushed as requests
finish (in finishing order), so a job that stops can be resumed: custom_ids already in OUTPUT are
skipped. A bad line becomes an error record and the job goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from pydantic import ValidationError

from roofline.errors import ContextOverflowError, InvalidRequestError, RooflineError
from roofline.outputs import CompletionOutput, RequestOutput
from roofline.sampling_params import SamplingParams
from roofline.server.chat import chat_token_logprob
from roofline.server.config import ServerConfig
from roofline.server.errors import APIError
from roofline.server.protocol import (ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs,
                                      ChatResponseMessage, CompletionChoice, CompletionLogprobs,
                                      CompletionRequest, CompletionResponse)
from roofline.server.sampling import check_request, finite_logprob, sampling_params, usage

ROUTES = ("/v1/completions", "/v1/chat/completions")
DUPLICATE = "duplicate_custom_id"  # the error code of a line reusing an earlier line's custom_id
_LINE_ERROR = re.compile(r"^line (\d+): ")  # how error records without a custom_id name their line


class BatchFileError(RooflineError):
    """An input or output file the job cannot use."""


class LineError(Exception):
    """A request line that cannot run; it becomes an error record."""

    def __init__(self, code: str, message: str, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.custom_id = custom_id  # None when the line has none (or is not JSON)


@dataclass
class BatchRequest:
    """One input line, validated and turned into engine prompts."""

    custom_id: str
    url: str
    request: CompletionRequest | ChatCompletionRequest
    prompts: list[str | list[int]]
    params: SamplingParams
    is_echo_only: bool = False  # /v1/completions with max_tokens=0 and echo: report the prompt only
    engine_ids: list[str] = field(default_factory=list)
    outputs: dict[int, RequestOutput] = field(default_factory=dict)  # prompt index -> final output

    @property
    def num_sequences(self) -> int:
        """Sequences this line puts in the engine."""
        return len(self.prompts) * self.params.n


# --- parsing: line -> BatchRequest ------------------------------------------------------------------------

def parse_line(text: str, tokenizer) -> BatchRequest:
    """Validate one request line; raises LineError with an OpenAI-style code."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LineError("invalid_json", f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise LineError("invalid_json", "a request line must be a JSON object")
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError("missing_custom_id", "custom_id must be a non-empty string")
    try:
        return _parse_request(custom_id, record, tokenizer)
    except LineError as exc:
        raise LineError(exc.code, exc.message, custom_id) from None


def _parse_request(custom_id: str, record: dict, tokenizer) -> BatchRequest:
    method, url, body = record.get("method", "POST"), record.get("url"), record.get("body")
    if str(method).upper() != "POST":
        raise LineError("invalid_method", f"method must be POST, got {method!r}")
    if url not in ROUTES:
        raise LineError("invalid_url", f"url must be one of {', '.join(ROUTES)}, got {url!r}")
    if not isinstance(body, dict):
        raise LineError("invalid_body", "body must be a JSON object")
    model = CompletionRequest if url == "/v1/completions" else ChatCompletionRequest
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise LineError("invalid_value", f"body.{where}: {first['msg']}") from None
    req.model = None  # every line runs on the job's model, whatever it names
    try:
        return _plan_completion(custom_id, req) if url == "/v1/completions" else _plan_chat(custom_id, req,
                                                                                            tokenizer)
    except APIError as exc:
        raise LineError(exc.code or "invalid_request", exc.message) from None
    except InvalidRequestError as exc:
        raise LineError("invalid_value", str(exc)) from None


_CHECKS = ServerConfig(model_name="batch", max_choices=128)


def _plan_completion(custom_id: str, req: CompletionRequest) -> BatchRequest:
    p = req.prompt
    prompts = [p] if isinstance(p, str) else [list(p)] if p and isinstance(p[0], int) else list(p)
    if not prompts:
        raise LineError("invalid_value", "prompt must not be empty")
    check_request(req, len(prompts), _CHECKS, has_logprobs=req.logprobs is not None)
    if req.suffix or (req.best_of is not None and req.best_of != req.n):
        raise LineError("unsupported_parameter", "suffix and best_of (other than n) are not supported")
    is_echo_only = req.max_tokens == 0
    if is_echo_only and not req.echo:
        raise LineError("invalid_value", "max_tokens must be >= 1 (0 is allowed only with echo=true)")
    prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    params = sampling_params(req, 1 if is_echo_only else req.max_tokens, req.logprobs, prompt_logprobs)
    return BatchRequest(custom_id, "/v1/completions", req, prompts, params, is_echo_only)


def _plan_chat(custom_id: str, req: ChatCompletionRequest, tokenizer) -> BatchRequest:
    check_request(req, 1, _CHECKS, has_logprobs=req.logprobs)
    if req.tools or req.functions or req.tool_choice not in (None, "none", "auto"):
        raise LineError("unsupported_parameter", "tools and function calling are not supported")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise LineError("unsupported_parameter", "only response_format {\"type\": \"text\"} is supported")
    conversation = []
    for i, msg in enumerate(req.messages):
        if msg.role in ("tool", "function"):
            raise LineError("unsupported_parameter", f"messages[{i}] has role {msg.role!r}; tools are not supported")
        if isinstance(msg.content, list):
            if any(part.type != "text" or part.text is None for part in msg.content):
                raise LineError("unsupported_content", f"messages[{i}]: only text content parts are supported")
            content = "\n".join(part.text for part in msg.content)
        elif msg.content is None and msg.role != "assistant":
            raise LineError("invalid_value", f"messages[{i}] has no content")
        else:
            content = msg.content or ""
        conversation.append({"role": "system" if msg.role == "developer" else msg.role, "content": content})
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, req.max_completion_tokens or req.max_tokens, logprobs)
    return BatchRequest(custom_id, "/v1/chat/completions", req, [prompt_ids], params)


# --- responses: finished outputs -> OpenAI bodies and batch records --------------------------------------

def _token_text(entry: dict | None, tid: int, token_text) -> str:
    chosen = entry.get(tid) if entry else None
    return chosen.decoded_token if chosen and chosen.decoded_token is not None else token_text(tid)


def _completion_logprobs(req: CompletionRequest, out: RequestOutput, c: CompletionOutput, is_echo_only: bool,
                         token_text) -> CompletionLogprobs:
    lp = CompletionLogprobs(processed_token_logprobs=[] if req.processed_logprobs else None)
    rows = []
    if req.echo:
        entries = out.prompt_logprobs or []
        rows += [(tid, entries[k] if k < len(entries) else None) for k, tid in enumerate(out.prompt_token_ids)]
    if not is_echo_only:
        rows += list(zip(c.token_ids, c.logprobs or []))
    offset = 0
    for tid, entry in rows:
        chosen = entry.get(tid) if entry else None
        text = _token_text(entry, tid, token_text)
        lp.tokens.append(text)
        lp.token_logprobs.append(finite_logprob(chosen.logprob) if chosen else None)
        lp.top_logprobs.append(None if entry is None else {
            (e.decoded_token or ""): finite_logprob(e.logprob) for e in sorted(entry.values(), key=lambda e: e.rank)})
        lp.text_offset.append(offset)
        if lp.processed_token_logprobs is not None:
            lp.processed_token_logprobs.append(finite_logprob(chosen.processed_logprob) if chosen else None)
        offset += len(text)
    return lp


def completion_body(job: BatchRequest, model: str, tokenizer) -> dict:
    """The /v1/completions response body of a finished line."""
    req = job.request
    outputs = [job.outputs[i] for i in range(len(job.prompts))]
    choices = []
    for i, out in enumerate(outputs):
        prompt = job.prompts[i]
        echo = (prompt if isinstance(prompt, str) else tokenizer.decode(prompt, skip_special_tokens=False)) \
            if req.echo else ""
        for c in out.outputs:
            logprobs = None if req.logprobs is None else _completion_logprobs(req, out, c, job.is_echo_only,
                                                                               tokenizer.token_text)
            text = echo + ("" if job.is_echo_only else c.text)
            choices.append(CompletionChoice(index=i * req.n + c.index, text=text, logprobs=logprobs,
                                            finish_reason=c.finish_reason))
    body = CompletionResponse(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model, choices=choices,
                              usage=usage(outputs, count_completion=not job.is_echo_only))
    return body.model_dump(mode="json")


def chat_body(job: BatchRequest, model: str, tokenizer) -> dict:
    """The /v1/chat/completions response body of a finished line."""
    req, out = job.request, job.outputs[0]
    choices = []
    for c in out.outputs:
        logprobs = None
        if req.logprobs:
            logprobs = ChatLogprobs(content=[chat_token_logprob(tid, entry, req.top_logprobs or 0, tokenizer.token_text)
                                             for tid, entry in zip(c.token_ids, c.logprobs or [])])
        choices.append(ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text), logprobs=logprobs,
                                  finish_reason=c.finish_reason))
    body = ChatCompletionResponse(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model,
                                  choices=choices, usage=usage([out]))
    return body.model_dump(mode="json")


def output_record(custom_id: str, request_id: str, body: dict) -> dict:
    """A successful batch output line."""
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


def error_record(custom_id: str | None, code: str, message: str) -> dict:
    """A failed batch output line."""
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


# --- the job ---------------------------------------------------------------------------------------------

@dataclass
class BatchSummary:
    """What a run did."""

    num_done: int = 0  # success records written
    num_errors: int = 0  # error records written
    num_skipped: int = 0  # lines already answered in OUTPUT
    num_generated_tokens: int = 0
    seconds: float = 0.0


def answered(output_path: str) -> tuple[set[str], set[int]]:
    """custom_ids answered in OUTPUT, and the input lines answered by records that cannot name their request
    by id (no custom_id, or a duplicate's); a torn last line (an interrupted write) is cut off."""
    ids: set[str] = set()
    lines: set[int] = set()
    if not os.path.exists(output_path):
        return ids, lines
    with open(output_path, "rb+") as f:
        data_end = 0
        for raw in iter(f.readline, b""):
            if not raw.endswith(b"\n"):  # an interrupted write: cut it off and redo that request
                f.truncate(data_end)
                break
            data_end += len(raw)
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
            error = record.get("error") if isinstance(record.get("error"), dict) else {}
            custom_id = record.get("custom_id")
            if isinstance(custom_id, str) and error.get("code") != DUPLICATE:
                ids.add(custom_id)
            elif match := _LINE_ERROR.match(str(error.get("message", ""))):
                lines.add(int(match.group(1)))
    return ids, lines


def read_lines(input_path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of the non-blank input lines, read lazily."""
    with open(input_path, encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, 1):
            if text.strip():
                yield number, text


class BatchJob:
    """Feeds request lines to an LLMEngine, at most `window` sequences at a time, and writes records."""

    def __init__(self, engine, output, model_name: str, window: int, progress=None) -> None:
        self.engine = engine
        self.output = output  # a text file opened for appending
        self.model_name = model_name
        self.window = window
        self.progress = progress  # a tqdm bar, or None
        self.in_flight: dict[str, BatchRequest] = {}  # engine request id -> its line
        self.num_sequences = 0
        self.summary = BatchSummary()
        self._next_id = 0

    def run(self, lines: Iterator[tuple[int, str]], done_ids: set[str], done_lines: set[int]) -> BatchSummary:
        """Run every line not answered yet; returns the counts."""
        start, tokens_before = time.monotonic(), self.engine.num_generated_tokens
        seen: set[str] = set()
        lines = iter(lines)
        is_exhausted = False
        try:
            while not is_exhausted or self.in_flight:
                while not is_exhausted and (self.num_sequences < self.window or not self.in_flight):
                    item = next(lines, None)
                    if item is None:
                        is_exhausted = True
                    else:
                        self._admit(*item, done_ids, done_lines, seen)
                if self.in_flight:
                    self._step()
                self.summary.num_generated_tokens = self.engine.num_generated_tokens - tokens_before
                self.summary.seconds = time.monotonic() - start
                if self.progress is not None:
                    rate = self.summary.num_generated_tokens / max(self.summary.seconds, 1e-9)
                    self.progress.set_postfix_str(f"{rate:.1f} tok/s", refresh=False)
        finally:  # interrupted: free the engine; unfinished lines are redone on resume
            self.engine.abort(list(self.in_flight))
        return self.summary

    def _admit(self, number: int, text: str, done_ids: set[str], done_lines: set[int], seen: set[str]) -> None:
        if number in done_lines:
            return self._skip()
        try:
            job = parse_line(text, self.engine.tokenizer)
        except LineError as exc:
            if exc.custom_id is None or self._claim(exc.custom_id, number, done_ids, seen):
                self._write(error_record(exc.custom_id, exc.code, f"line {number}: {exc.message}"), ok=False)
            return None
        if not self._claim(job.custom_id, number, done_ids, seen):
            return None
        priority = job.request.priority
        try:
            for prompt in job.prompts:
                rid = f"batch-{self._next_id}"
                self._next_id += 1
                self.engine.add_request(rid, prompt, job.params, priority)
                job.engine_ids.append(rid)
        except InvalidRequestError as exc:
            self.engine.abort(job.engine_ids)
            code = "context_length_exceeded" if isinstance(exc, ContextOverflowError) else "invalid_value"
            return self._write(error_record(job.custom_id, code, f"line {number}: {exc}"), ok=False)
        for rid in job.engine_ids:
            self.in_flight[rid] = job
        self.num_sequences += job.num_sequences

    def _claim(self, custom_id: str, number: int, done_ids: set[str], seen: set[str]) -> bool:
        """True when the line is to be answered now: its id is new to this file and not answered before.

        The first line with an id owns it; a later one gets a duplicate error (answered by line number, so
        on resume it does not hide the first line's answer)."""
        if custom_id in seen:
            self._write(error_record(custom_id, DUPLICATE, f"line {number}: custom_id {custom_id!r} was already "
                                                           f"used by an earlier line"), ok=False)
            return False
        seen.add(custom_id)
        if custom_id in done_ids:
            self._skip()
            return False
        return True

    def _step(self) -> None:
        for out in self.engine.step():
            if not out.finished:
                continue
            job = self.in_flight.pop(out.request_id)
            job.outputs[job.engine_ids.index(out.request_id)] = out
            if len(job.outputs) == len(job.prompts):
                self.num_sequences -= job.num_sequences
                build = completion_body if job.url == "/v1/completions" else chat_body
                body = build(job, self.model_name, self.engine.tokenizer)
                self._write(output_record(job.custom_id, job.engine_ids[0], body), ok=True)

    def _write(self, record: dict, ok: bool) -> None:
        self.output.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.output.flush()
        if ok:
            self.summary.num_done += 1
        else:
            self.summary.num_errors += 1
        if self.progress is not None:
            self.progress.update(1)

    def _skip(self) -> None:
        self.summary.num_skipped += 1
        if self.progress is not None:
            self.progress.update(1)


# --- the command -----------------------------------------------------------------------------------------

def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def cmd_batch(args: argparse.Namespace) -> int:
    """Run the job; error records do not change the exit status."""
    from roofline.cli import _make_llm
    from roofline.server.commands import served_model_name

    if not os.path.isfile(args.input):
        raise BatchFileError(f"input file {args.input!r} not found")
    if os.path.exists(args.output) and os.path.samefile(args.input, args.output):
        raise BatchFileError("OUTPUT must not be the INPUT file")
    if os.path.isdir(args.output):
        raise BatchFileError(f"output {args.output!r} is a directory; give a file path")
    llm = _make_llm(args)
    engine = llm.engine
    window = args.window or 2 * engine.config.scheduler.max_num_seqs
    done_ids, done_lines = answered(args.output)
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=_count_lines(args.input), desc="batch", unit="req", file=sys.stderr, mininterval=0.5)
    try:
        with open(args.output, "a", encoding="utf-8") as output:
            job = BatchJob(engine, output, served_model_name(args.model), window, progress)
            summary = job.run(read_lines(args.input), done_ids, done_lines)
    finally:
        if progress is not None:
            progress.close()
    rate = summary.num_generated_tokens / max(summary.seconds, 1e-9)
    print(f"roofline batch: {summary.num_done} done, {summary.num_errors} errors, {summary.num_skipped} skipped "
          f"(already in {args.output}); {summary.num_generated_tokens} tokens in {summary.seconds:.1f}s "
          f"({rate:.1f} tok/s)", file=sys.stderr)
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def add_batch_parser(subparsers) -> None:
    """Register `roofline batch`."""
    from roofline.cli import _add_engine_args

    p = subparsers.add_parser("batch", help="run an OpenAI Batch API file offline (JSONL in, JSONL out)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="INPUT.jsonl", help="request lines: custom_id, method, url, body")
    p.add_argument("output", metavar="OUTPUT.jsonl", help="output lines are appended; ids already there are skipped")
    _add_engine_args(p)
    p.add_argument("--window", type=_positive, default=None,
                   help="sequences in the engine at once (default: 2 x max_num_seqs); bounds memory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_batch)
