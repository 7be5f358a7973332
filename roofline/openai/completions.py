"""/v1/completions without a transport: request -> CompletionTask (prompts, SamplingParams) -> response body or
stream chunks. The HTTP route (server/completions.py) and `roofline batch` both build on it."""

from __future__ import annotations

from dataclasses import dataclass, field

from roofline.openai.errors import APIError
from roofline.openai.sampling import check_request, finite_logprob, sampling_params, usage
from roofline.outputs import CompletionOutput, Logprob, RequestOutput
from roofline.sampling_params import SamplingParams
from roofline.server.config import ServerConfig
from roofline.server.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse

Prompt = str | list[int]


@dataclass
class CompletionTask:
    """A validated completion request: what the engine runs."""

    request: CompletionRequest
    prompts: list[Prompt]
    params: SamplingParams
    is_echo_only: bool  # max_tokens=0 with echo: return the prompt (and its logprobs), generate nothing


def _prompts(req: CompletionRequest) -> list[Prompt]:
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if p and isinstance(p[0], int):
        return [list(p)]
    if not p:
        raise APIError(400, "prompt must not be empty", code="invalid_value", param="prompt")
    return list(p)


def plan_completion(req: CompletionRequest, config: ServerConfig) -> CompletionTask:
    """Check a completion request against what the engine honours; raises APIError."""
    prompts = _prompts(req)
    check_request(req, len(prompts), config, has_logprobs=req.logprobs is not None)
    if req.suffix:
        raise APIError(400, "suffix (insertion) is not supported; leave it out", code="unsupported_parameter",
                       param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of other than n is not supported; leave it out", code="unsupported_parameter",
                       param="best_of")
    is_echo_only = req.max_tokens == 0
    if is_echo_only and not req.echo:
        raise APIError(400, "max_tokens must be >= 1 (0 is allowed only with echo=true)", code="invalid_value",
                       param="max_tokens")
    prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    params = sampling_params(req, 1 if is_echo_only else req.max_tokens, req.logprobs, prompt_logprobs)
    return CompletionTask(req, prompts, params, is_echo_only)


class LogprobWriter:
    """Appends tokens to a CompletionLogprobs, keeping the character offset running across chunks."""

    def __init__(self, want_processed: bool, token_text) -> None:
        self.offset = 0
        self.want_processed = want_processed
        self.token_text = token_text  # token id -> its text, for tokens whose entry has no decoded text

    def new(self) -> CompletionLogprobs:
        """An empty logprobs object (with the extension list when asked for)."""
        return CompletionLogprobs(processed_token_logprobs=[] if self.want_processed else None)

    def add(self, lp: CompletionLogprobs, tid: int, entry: dict[int, Logprob] | None) -> None:
        """One token; `entry` None for the first prompt token, which has no logprob."""
        chosen = entry.get(tid) if entry else None
        text = chosen.decoded_token if chosen and chosen.decoded_token is not None else self.token_text(tid)
        lp.tokens.append(text)
        lp.token_logprobs.append(finite_logprob(chosen.logprob) if chosen else None)
        lp.top_logprobs.append(None if entry is None else {
            (e.decoded_token or ""): finite_logprob(e.logprob) for e in sorted(entry.values(), key=lambda e: e.rank)})
        lp.text_offset.append(self.offset)
        if lp.processed_token_logprobs is not None:
            lp.processed_token_logprobs.append(finite_logprob(chosen.processed_logprob) if chosen else None)
        self.offset += len(text)

    def add_prompt(self, lp: CompletionLogprobs, out: RequestOutput) -> None:
        """The prompt's tokens (echo)."""
        entries = out.prompt_logprobs or []
        for k, tid in enumerate(out.prompt_token_ids):
            self.add(lp, tid, entries[k] if k < len(entries) else None)

    def add_generated(self, lp: CompletionLogprobs, c: CompletionOutput, start: int) -> int:
        """Generated tokens from index `start`; returns the index reached."""
        entries = c.logprobs or []
        end = min(len(c.token_ids), len(entries))
        for k in range(start, end):
            self.add(lp, c.token_ids[k], entries[k])
        return max(end, start)


def echo_text(prompt: Prompt, tokenizer) -> str:
    """The prompt as echo returns it."""
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt, skip_special_tokens=False)


def completion_response(task: CompletionTask, outputs: list[RequestOutput], response_id: str, created: int,
                        model: str, tokenizer) -> CompletionResponse:
    """The response body once every prompt's output finished (outputs in prompt order)."""
    req = task.request
    choices = []
    for i, out in enumerate(outputs):
        for c in out.outputs:
            text = "" if task.is_echo_only else c.text
            logprobs = None
            if req.logprobs is not None:
                writer = LogprobWriter(req.processed_logprobs, tokenizer.token_text)
                logprobs = writer.new()
                if req.echo:
                    writer.add_prompt(logprobs, out)
                if not task.is_echo_only:
                    writer.add_generated(logprobs, c, 0)
            prefix = echo_text(task.prompts[i], tokenizer) if req.echo else ""
            choices.append(CompletionChoice(index=i * req.n + c.index, text=prefix + text, logprobs=logprobs,
                                            finish_reason=c.finish_reason))
    return CompletionResponse(id=response_id, created=created, model=model, choices=choices,
                              usage=usage(outputs, count_completion=not task.is_echo_only))


@dataclass
class _ChoiceState:
    """How much of one choice has been sent."""

    writer: LogprobWriter
    num_chars: int = 0
    num_tokens: int = 0
    has_started: bool = False
    is_done: bool = False


@dataclass
class CompletionStreamer:
    """Output snapshots -> stream chunks: text deltas per choice, then usage (if asked)."""

    task: CompletionTask
    response_id: str
    created: int
    model: str
    tokenizer: object
    _states: dict[int, _ChoiceState] = field(default_factory=dict)

    def _body(self, choices: list[CompletionChoice], usage_=None) -> CompletionResponse:
        return CompletionResponse(id=self.response_id, created=self.created, model=self.model, choices=choices,
                                  usage=usage_)

    def chunk(self, i: int, out: RequestOutput) -> CompletionResponse | None:
        """The chunk for a new snapshot of prompt i's output, or None when it adds nothing."""
        req, task = self.task.request, self.task
        choices = []
        for c in out.outputs:
            index = i * req.n + c.index
            st = self._states.setdefault(index, _ChoiceState(LogprobWriter(req.processed_logprobs,
                                                                           self.tokenizer.token_text)))
            if st.is_done:
                continue
            text = "" if task.is_echo_only else c.text[st.num_chars:]
            st.num_chars = max(st.num_chars, len(c.text))
            logprobs = st.writer.new() if req.logprobs is not None else None
            if not st.has_started and req.echo:
                text = echo_text(task.prompts[i], self.tokenizer) + text
                if logprobs is not None:
                    st.writer.add_prompt(logprobs, out)
            if logprobs is not None and not task.is_echo_only:
                st.num_tokens = st.writer.add_generated(logprobs, c, st.num_tokens)
            st.has_started = True
            st.is_done = c.finished
            if text or c.finished or (logprobs is not None and logprobs.tokens):
                choices.append(CompletionChoice(index=index, text=text, logprobs=logprobs,
                                                finish_reason=c.finish_reason))
        return self._body(choices) if choices else None

    def usage_chunk(self, outputs: list[RequestOutput]) -> CompletionResponse | None:
        """The last chunk with the request's usage, when the request asked for it."""
        if not self.task.request.include_usage:
            return None
        return self._body([], usage(outputs, count_completion=not self.task.is_echo_only))
