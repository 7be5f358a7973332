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

from roofline import engine_args
from roofline.engine_args import add_engine_args, served_model_name
from roofline.errors import ContextOverflowError, InvalidRequestError, RooflineError
from roofline.openai.chat import ChatTask, chat_response, plan_chat
from roofline.openai.completions import CompletionTask, completion_response, plan_completion
from roofline.openai.errors import APIError
from roofline.openai.sampling import new_id, now
from roofline.outputs import RequestOutput
from roofline.sampling_params import SamplingParams
from roofline.server.config import ServerConfig
from roofline.server.protocol import ChatCompletionRequest, CompletionRequest

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
    """One input line, validated and turned into engine prompts by the shared translation (roofline/openai/)."""

    custom_id: str
    url: str
    task: CompletionTask | ChatTask
    engine_ids: list[str] = field(default_factory=list)
    outputs: dict[int, RequestOutput] = field(default_factory=dict)  # prompt index -> final output

    @property
    def prompts(self) -> list[str | list[int]]:
        """What the engine runs for this line: a completion's prompts, a chat's rendered prompt."""
        return self.task.prompts if isinstance(self.task, CompletionTask) else [self.task.prompt_ids]

    @property
    def params(self) -> SamplingParams:
        return self.task.params

    @property
    def num_sequences(self) -> int:
        """Sequences this line puts in the engine."""
        return len(self.prompts) * self.params.n

    def response_body(self, model: str, tokenizer) -> dict:
        """The response body the server would return for this line, once every output finished."""
        response_id, created = new_id("cmpl" if isinstance(self.task, CompletionTask) else "chatcmpl"), now()
        if isinstance(self.task, CompletionTask):
            outputs = [self.outputs[i] for i in range(len(self.prompts))]
            body = completion_response(self.task, outputs, response_id, created, model, tokenizer)
        else:
            body = chat_response(self.task, self.outputs[0], response_id, created, model, tokenizer)
        return body.model_dump(mode="json")


# --- parsing: line -> BatchRequest ------------------------------------------------------------------------

def parse_line(text: str, tokenizer, max_model_len: int) -> BatchRequest:
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
        return _parse_request(custom_id, record, tokenizer, max_model_len)
    except LineError as exc:
        raise LineError(exc.code, exc.message, custom_id) from None


# the server's request limits, with room for a batch line's many prompts
_CHECKS = ServerConfig(model_name="batch", max_choices=128)


def _parse_request(custom_id: str, record: dict, tokenizer, max_model_len: int) -> BatchRequest:
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
        if url == "/v1/completions":
            task = plan_completion(req, _CHECKS)
        else:
            task = plan_chat(req, _CHECKS, tokenizer, max_model_len)
    except APIError as exc:
        raise LineError(exc.code or "invalid_request", exc.message) from None
    return BatchRequest(custom_id, url, task)


# --- records ---------------------------------------------------------------------------------------------

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
            job = parse_line(text, self.engine.tokenizer, self.engine.max_model_len)
        except LineError as exc:
            if exc.custom_id is None or self._claim(exc.custom_id, number, done_ids, seen):
                self._write(error_record(exc.custom_id, exc.code, f"line {number}: {exc.message}"), ok=False)
            return None
        if not self._claim(job.custom_id, number, done_ids, seen):
            return None
        priority = job.task.request.priority
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
                body = job.response_body(self.model_name, self.engine.tokenizer)
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
    if not os.path.isfile(args.input):
        raise BatchFileError(f"input file {args.input!r} not found")
    if os.path.exists(args.output) and os.path.samefile(args.input, args.output):
        raise BatchFileError("OUTPUT must not be the INPUT file")
    if os.path.isdir(args.output):
        raise BatchFileError(f"output {args.output!r} is a directory; give a file path")
    llm = engine_args.make_llm(args)
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
    p = subparsers.add_parser("batch", help="run an OpenAI Batch API file offline (JSONL in, JSONL out)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="INPUT.jsonl", help="request lines: custom_id, method, url, body")
    p.add_argument("output", metavar="OUTPUT.jsonl", help="output lines are appended; ids already there are skipped")
    add_engine_args(p)
    p.add_argument("--window", type=_positive, default=None,
                   help="sequences in the engine at once (default: 2 x max_num_seqs); bounds memory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_batch)
