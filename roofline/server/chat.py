"""POST /v1/chat/completions: messages -> chat-template prompt and SamplingParams; snapshots -> JSON or SSE."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from roofline.errors import InvalidRequestError
from roofline.outputs import CompletionOutput, Logprob
from roofline.server.context import ServingContext
from roofline.server.errors import APIError
from roofline.server.generation import GenerationStream
from roofline.server.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                                      ChatDelta, ChatLogprobs, ChatMessage, ChatResponseMessage, ChatStreamChoice,
                                      ChatTokenLogprob, FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta,
                                      TopLogprob)
from roofline.server.sampling import check_request, finite_logprob, new_id, now, sampling_params, usage
from roofline.server.streaming import SSE_DONE, sse_event
from roofline.server.tools import ParsedCall, ToolCallStream, ToolPlan, plan_tools, render_messages


@dataclass
class ChatPlan:
    """A validated chat request, ready for the engine."""

    request: ChatCompletionRequest
    stream: GenerationStream
    response_id: str
    created: int
    tools: ToolPlan | None = None  # the tools the model may call (their calls are parsed from its text)


def _message_text(i: int, msg: ChatMessage) -> str:
    if msg.content is None:
        if msg.role == "assistant":
            return ""
        raise APIError(400, f"messages[{i}] has no content", code="invalid_value", param=f"messages[{i}].content")
    if isinstance(msg.content, str):
        return msg.content
    texts = []
    for part in msg.content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"messages[{i}] has a content part of type {part.type!r}; only text parts "
                                f"({{\"type\": \"text\", \"text\": ...}}) are supported",
                           code="unsupported_content", param=f"messages[{i}].content")
        texts.append(part.text)
    return "\n".join(texts)


def conversation_of(chat_messages: list[ChatMessage], tools: ToolPlan | None = None,
                    template_takes_tools: bool = False) -> list[dict]:
    """The messages as the chat template takes them (text only; tool calls and results as server/tools.py says)."""
    texts = [_message_text(i, msg) for i, msg in enumerate(chat_messages)]
    return render_messages(chat_messages, texts, tools, template_takes_tools)


def _check_unsupported(req: ChatCompletionRequest) -> None:
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", code="invalid_value", param="top_logprobs")


async def plan_chat(req: ChatCompletionRequest, ctx: ServingContext) -> ChatPlan:
    """Check a chat request, render its prompt and build its GenerationStream (not started)."""
    check_request(req, 1, ctx.config, has_logprobs=req.logprobs)
    _check_unsupported(req)
    tok = ctx.tokenizer
    tool_plan = plan_tools(req)
    conversation = conversation_of(req.messages, tool_plan, tok.template_takes_tools)
    template_tools = tool_plan.tools if tool_plan is not None and tok.template_takes_tools else None
    # a floor on the prompt's length, known without rendering or tokenizing it: a body of megabytes is refused
    # at once instead of after seconds of tokenizing
    floor = sum(len(m["content"].encode()) for m in conversation) // tok.max_token_bytes
    if floor >= ctx.max_model_len:
        raise APIError(400, f"the messages encode to at least {floor} tokens but the context limit is "
                            f"{ctx.max_model_len}", code="context_length_exceeded", param="messages")

    def render() -> list[int]:
        text = tok.apply_chat_template(conversation, add_generation_prompt=True, tools=template_tools)
        return tok.encode(text, add_special_tokens=False)

    try:  # off the event loop: a long conversation takes a while to render and tokenize
        prompt_ids = await asyncio.to_thread(render)
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), code="invalid_value", param="messages") from None
    max_tokens = req.max_completion_tokens or req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, max_tokens, logprobs)
    if tool_plan is not None and tool_plan.structured is not None:  # "required" or a named function: one call
        params = replace(params, structured=tool_plan.structured)
    rid = new_id("chatcmpl")
    stream = GenerationStream(ctx.engine, [prompt_ids], params, rid, req.priority, ctx.metrics,
                              ctx.config.retry_after_s, param="messages")
    return ChatPlan(req, stream, rid, now(), tool_plan)


def chat_token_logprob(tid: int, entry: dict[int, Logprob], num_top: int, token_text) -> ChatTokenLogprob:
    """One chat `logprobs.content` item: the chosen token's raw logprob and its top alternatives."""
    chosen = entry.get(tid)
    text = chosen.decoded_token if chosen and chosen.decoded_token is not None else token_text(tid)
    top = [TopLogprob(token=e.decoded_token or "", logprob=finite_logprob(e.logprob),
                      bytes=list((e.decoded_token or "").encode()))
           for e in sorted(entry.values(), key=lambda e: e.rank) if e.rank <= num_top][:num_top]
    return ChatTokenLogprob(token=text, logprob=finite_logprob(chosen.logprob) if chosen else -9999.0,
                            bytes=list(text.encode()), top_logprobs=top,
                            processed_logprob=finite_logprob(chosen.processed_logprob) if chosen else None)


def _logprobs(req: ChatCompletionRequest, c: CompletionOutput, start: int,
              token_text) -> tuple[ChatLogprobs | None, int]:
    if not req.logprobs:
        return None, start
    entries = c.logprobs or []
    end = max(min(len(c.token_ids), len(entries)), start)
    content = [chat_token_logprob(c.token_ids[k], entries[k], req.top_logprobs or 0, token_text)
               for k in range(start, end)]
    return ChatLogprobs(content=content), end


def chat_response(plan: ChatPlan, ctx: ServingContext) -> ChatCompletionResponse:
    """The JSON body once the stream finished."""
    out = plan.stream.latest[0]
    choices = []
    for c in out.outputs:
        logprobs, _ = _logprobs(plan.request, c, 0, ctx.tokenizer.token_text)
        content, calls = plan.tools.parse(c.text) if plan.tools is not None else (c.text, [])
        message = ChatResponseMessage(content=content, tool_calls=[
            ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments)) for call in calls]
            if calls else None)
        choices.append(ChatChoice(index=c.index, message=message, logprobs=logprobs,
                                  finish_reason="tool_calls" if calls else c.finish_reason))
    return ChatCompletionResponse(id=plan.response_id, created=plan.created, model=ctx.config.model_name,
                                  choices=choices, usage=usage([out]))


async def chat_events(plan: ChatPlan, ctx: ServingContext) -> AsyncIterator[bytes]:
    """SSE events for a started stream: a role chunk, content deltas, a finish chunk per choice, usage, [DONE]."""
    req = plan.request
    model = ctx.config.model_name

    def chunk(choices: list[ChatStreamChoice], usage_=None) -> bytes:
        body = ChatCompletionChunk(id=plan.response_id, created=plan.created, model=model, choices=choices,
                                   usage=usage_)
        return sse_event(body.model_dump_json())

    yield chunk([ChatStreamChoice(index=j, delta=ChatDelta(role="assistant", content=""))
                 for j in range(req.n)])
    num_chars = [0] * req.n
    num_tokens = [0] * req.n
    is_done = [False] * req.n
    held = [ToolCallStream() for _ in range(req.n)] if plan.tools is not None else None
    async for _, out in plan.stream.events():
        deltas, tails, finishes = [], [], []  # a tail: one chunk each (a choice appears once per chunk)
        for c in out.outputs:
            j = c.index
            if is_done[j]:
                continue
            if held is None:
                text = c.text[num_chars[j]:]
                num_chars[j] = max(num_chars[j], len(c.text))
            else:  # what may be a tool call waits for the end
                text = held[j].content_delta(c.text)
            logprobs, num_tokens[j] = _logprobs(req, c, num_tokens[j], ctx.tokenizer.token_text)
            if text or (logprobs is not None and logprobs.content):
                deltas.append(ChatStreamChoice(index=j, delta=ChatDelta(content=text), logprobs=logprobs))
            if c.finished:
                is_done[j] = True
                calls: list[ParsedCall] = []
                if held is not None:
                    content, calls = plan.tools.parse(c.text)
                    if rest := held[j].rest(content, c.text):
                        tails.append(ChatStreamChoice(index=j, delta=ChatDelta(content=rest)))
                    tails += _tool_call_deltas(j, calls)
                finishes.append(ChatStreamChoice(index=j, delta=ChatDelta(),
                                                 finish_reason="tool_calls" if calls else c.finish_reason))
        if deltas:
            yield chunk(deltas)
        for tail in tails:
            yield chunk([tail])
        if finishes:
            yield chunk(finishes)
    if req.include_usage:
        yield chunk([], usage([plan.stream.latest[0]]))
    yield SSE_DONE


def _tool_call_deltas(j: int, calls: list[ParsedCall]) -> list[ChatStreamChoice]:
    """OpenAI's streamed shape of choice j's calls: per call, id, type and name first, then the arguments."""
    out = []
    for k, call in enumerate(calls):
        out.append(ChatStreamChoice(index=j, delta=ChatDelta(tool_calls=[ToolCallDelta(
            index=k, id=call.id, type="function", function=FunctionCallDelta(name=call.name, arguments=""))])))
        out.append(ChatStreamChoice(index=j, delta=ChatDelta(tool_calls=[ToolCallDelta(
            index=k, function=FunctionCallDelta(arguments=call.arguments))])))
    return out
