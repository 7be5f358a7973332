"""POST /v1/completions: request -> engine prompts and SamplingParams; snapshots -> OpenAI JSON or SSE."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from roofline.outputs import CompletionOutput, Logprob, RequestOutput
from roofline.server.context import ServingContext
from roofline.server.errors import APIError
from roofline.server.generation import GenerationStream, Prompt
from roofline.server.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from roofline.server.sampling import check_request, finite_logprob, new_id, now, sampling_params, usage
from roofline.server.streaming import SSE_DONE, sse_event


@dataclass
class CompletionPlan:
    """A validated completion request, ready for the engine."""

    request: CompletionRequest
    prompts: list[Prompt]
    stream: GenerationStream
    is_echo_only: bool  # max_tokens=0 with echo: return the prompt (and its logprobs), generate nothing
    response_id: str
    created: int


def _prompts(req: CompletionRequest) -> list[Prompt]:
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if p and isinstance(p[0], int):
        return [list(p)]
    if not p:
        raise APIError(400, "prompt must not be empty", code="invalid_value", param="prompt")
    return list(p)


def plan_completion(req: CompletionRequest, ctx: ServingContext) -> CompletionPlan:
    """Check a completion request and build its GenerationStream (not started)."""
    prompts = _prompts(req)
    check_request(req, len(prompts), ctx.config, has_logprobs=req.logprobs is not None)
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
    rid = new_id("cmpl")
    stream = GenerationStream(ctx.engine, prompts, params, rid, req.priority, ctx.metrics,
                              ctx.config.retry_after_s, param="prompt")
    return CompletionPlan(req, prompts, stream, is_echo_only, rid, now())


class _LogprobWriter:
    """Appends tokens to a CompletionLogprobs, keeping the character offset running across chunks."""

    def __init__(self, want_processed: bool) -> None:
        self.offset = 0
        self.want_processed = want_processed

    def new(self) -> CompletionLogprobs:
        """An empty logprobs object (with the extension list when asked for)."""
        return CompletionLogprobs(processed_token_logprobs=[] if self.want_processed else None)

    def add(self, lp: CompletionLogprobs, token_text: str, entry: dict[int, Logprob] | None,
            chosen: Logprob | None) -> None:
        """One token; `entry` None for the first prompt token, which has no logprob."""
        lp.tokens.append(token_text)
        lp.token_logprobs.append(finite_logprob(chosen.logprob) if chosen else None)
        lp.top_logprobs.append(None if entry is None else {
            (e.decoded_token or ""): finite_logprob(e.logprob) for e in sorted(entry.values(), key=lambda e: e.rank)})
        lp.text_offset.append(self.offset)
        if lp.processed_token_logprobs is not None:
            lp.processed_token_logprobs.append(finite_logprob(chosen.processed_logprob) if chosen else None)
        self.offset += len(token_text)

    def add_prompt(self, lp: CompletionLogprobs, out: RequestOutput, token_text) -> None:
        """The prompt's tokens (echo)."""
        entries = out.prompt_logprobs or []
        for k, tid in enumerate(out.prompt_token_ids):
            entry = entries[k] if k < len(entries) else None
            chosen = entry.get(tid) if entry else None
            self.add(lp, chosen.decoded_token if chosen and chosen.decoded_token is not None else token_text(tid),
                     entry, chosen)

    def add_generated(self, lp: CompletionLogprobs, c: CompletionOutput, start: int, token_text) -> int:
        """Generated tokens from index `start`; returns the index reached."""
        entries = c.logprobs or []
        end = min(len(c.token_ids), len(entries))
        for k in range(start, end):
            tid = c.token_ids[k]
            chosen = entries[k].get(tid)
            self.add(lp, chosen.decoded_token if chosen and chosen.decoded_token is not None else token_text(tid),
                     entries[k], chosen)
        return max(end, start)


def _echo_text(prompt: Prompt, ctx: ServingContext) -> str:
    return prompt if isinstance(prompt, str) else ctx.tokenizer.decode(prompt, skip_special_tokens=False)


def completion_response(plan: CompletionPlan, ctx: ServingContext) -> CompletionResponse:
    """The JSON body once the stream finished."""
    req = plan.request
    outputs = [out for out in plan.stream.latest if out is not None]
    token_text = ctx.tokenizer.token_text
    choices = []
    for i, out in enumerate(outputs):
        for c in out.outputs:
            text = "" if plan.is_echo_only else c.text
            logprobs = None
            if req.logprobs is not None:
                writer = _LogprobWriter(req.processed_logprobs)
                logprobs = writer.new()
                if req.echo:
                    writer.add_prompt(logprobs, out, token_text)
                if not plan.is_echo_only:
                    writer.add_generated(logprobs, c, 0, token_text)
            prefix = _echo_text(plan.prompts[i], ctx) if req.echo else ""
            choices.append(CompletionChoice(index=i * req.n + c.index, text=prefix + text, logprobs=logprobs,
                                            finish_reason=c.finish_reason))
    return CompletionResponse(id=plan.response_id, created=plan.created, model=ctx.config.model_name,
                              choices=choices, usage=usage(outputs, count_completion=not plan.is_echo_only))


@dataclass
class _ChoiceState:
    """How much of one choice has been sent."""

    writer: _LogprobWriter
    num_chars: int = 0
    num_tokens: int = 0
    has_started: bool = False
    is_done: bool = False


async def completion_events(plan: CompletionPlan, ctx: ServingContext) -> AsyncIterator[bytes]:
    """SSE events for a started stream: text deltas per choice, then usage (if asked) and [DONE]."""
    req = plan.request
    token_text = ctx.tokenizer.token_text
    states: dict[int, _ChoiceState] = {}
    model = ctx.config.model_name

    def chunk(choices: list[CompletionChoice], usage_=None) -> bytes:
        body = CompletionResponse(id=plan.response_id, created=plan.created, model=model, choices=choices,
                                  usage=usage_)
        return sse_event(body.model_dump_json())

    async for i, out in plan.stream.events():
        choices = []
        for c in out.outputs:
            index = i * req.n + c.index
            st = states.setdefault(index, _ChoiceState(_LogprobWriter(req.processed_logprobs)))
            if st.is_done:
                continue
            text = "" if plan.is_echo_only else c.text[st.num_chars:]
            st.num_chars = max(st.num_chars, len(c.text))
            logprobs = st.writer.new() if req.logprobs is not None else None
            if not st.has_started and req.echo:
                text = _echo_text(plan.prompts[i], ctx) + text
                if logprobs is not None:
                    st.writer.add_prompt(logprobs, out, token_text)
            if logprobs is not None and not plan.is_echo_only:
                st.num_tokens = st.writer.add_generated(logprobs, c, st.num_tokens, token_text)
            st.has_started = True
            st.is_done = c.finished
            if text or c.finished or (logprobs is not None and logprobs.tokens):
                choices.append(CompletionChoice(index=index, text=text, logprobs=logprobs,
                                                finish_reason=c.finish_reason))
        if choices:
            yield chunk(choices)
    if req.include_usage:
        finals = [o for o in plan.stream.latest if o is not None]
        yield chunk([], usage(finals, count_completion=not plan.is_echo_only))
    yield SSE_DONE
