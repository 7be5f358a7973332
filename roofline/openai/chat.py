"""/v1/chat/completions without a transport: request -> ChatTask (chat-template prompt, SamplingParams, tools)
-> response body or stream chunks. The HTTP route (server/chat.py) and `roofline batch` both build on it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from roofline.errors import InvalidRequestError
from roofline.openai.errors import APIError
from roofline.openai.sampling import check_request, finite_logprob, sampling_params, usage
from roofline.openai.tools import ParsedCall, ToolCallStream, ToolPlan, plan_tools, render_messages
from roofline.outputs import CompletionOutput, Logprob, RequestOutput
from roofline.sampling_params import SamplingParams
from roofline.server.config import ServerConfig
from roofline.server.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                                      ChatDelta, ChatLogprobs, ChatMessage, ChatResponseMessage, ChatStreamChoice,
                                      ChatTokenLogprob, FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta,
                                      TopLogprob)


@dataclass
class ChatTask:
    """A validated chat request: what the engine runs."""

    request: ChatCompletionRequest
    prompt_ids: list[int]  # the rendered chat template, tokenized
    params: SamplingParams
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
    """The messages as the chat template takes them (text only; tool calls and results as openai/tools.py says)."""
    texts = [_message_text(i, msg) for i, msg in enumerate(chat_messages)]
    return render_messages(chat_messages, texts, tools, template_takes_tools)


def plan_chat(req: ChatCompletionRequest, config: ServerConfig, tokenizer, max_model_len: int) -> ChatTask:
    """Check a chat request, render and tokenize its prompt; raises APIError. Takes a while for a long
    conversation: the server runs it off its event loop."""
    check_request(req, 1, config, has_logprobs=req.logprobs)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", code="invalid_value", param="top_logprobs")
    tool_plan = plan_tools(req)
    conversation = conversation_of(req.messages, tool_plan, tokenizer.template_takes_tools)
    template_tools = tool_plan.tools if tool_plan is not None and tokenizer.template_takes_tools else None
    # a floor on the prompt's length, known without rendering or tokenizing it: a body of megabytes is refused
    # at once instead of after seconds of tokenizing
    floor = sum(len(m["content"].encode()) for m in conversation) // tokenizer.max_token_bytes
    if floor >= max_model_len:
        raise APIError(400, f"the messages encode to at least {floor} tokens but the context limit is "
                            f"{max_model_len}", code="context_length_exceeded", param="messages")
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tools=template_tools)
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), code="invalid_value", param="messages") from None
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, req.max_completion_tokens or req.max_tokens, logprobs)
    if tool_plan is not None and tool_plan.structured is not None:  # "required" or a named function: one call
        params = replace(params, structured=tool_plan.structured)
    return ChatTask(req, prompt_ids, params, tool_plan)


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


def chat_response(task: ChatTask, out: RequestOutput, response_id: str, created: int, model: str,
                  tokenizer) -> ChatCompletionResponse:
    """The response body once the output finished."""
    choices = []
    for c in out.outputs:
        logprobs, _ = _logprobs(task.request, c, 0, tokenizer.token_text)
        content, calls = task.tools.parse(c.text) if task.tools is not None else (c.text, [])
        message = ChatResponseMessage(content=content, tool_calls=[
            ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments)) for call in calls]
            if calls else None)
        choices.append(ChatChoice(index=c.index, message=message, logprobs=logprobs,
                                  finish_reason="tool_calls" if calls else c.finish_reason))
    return ChatCompletionResponse(id=response_id, created=created, model=model, choices=choices, usage=usage([out]))


@dataclass
class ChatStreamer:
    """Output snapshots -> stream chunks: a role chunk, content deltas, a finish chunk per choice, usage."""

    task: ChatTask
    response_id: str
    created: int
    model: str
    tokenizer: object
    _num_chars: list[int] = field(init=False)
    _num_tokens: list[int] = field(init=False)
    _is_done: list[bool] = field(init=False)
    _held: list[ToolCallStream] | None = field(init=False)  # what may be a tool call waits for the end

    def __post_init__(self) -> None:
        n = self.task.request.n
        self._num_chars, self._num_tokens, self._is_done = [0] * n, [0] * n, [False] * n
        self._held = [ToolCallStream() for _ in range(n)] if self.task.tools is not None else None

    def _chunk(self, choices: list[ChatStreamChoice], usage_=None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.response_id, created=self.created, model=self.model, choices=choices,
                                   usage=usage_)

    def first_chunk(self) -> ChatCompletionChunk:
        """The role chunk every choice starts with."""
        return self._chunk([ChatStreamChoice(index=j, delta=ChatDelta(role="assistant", content=""))
                            for j in range(self.task.request.n)])

    def chunks(self, out: RequestOutput) -> list[ChatCompletionChunk]:
        """The chunks for a new snapshot: the deltas, then each tail (tool calls) alone, then the finishes."""
        req, token_text = self.task.request, self.tokenizer.token_text
        deltas, tails, finishes = [], [], []  # a tail: one chunk each (a choice appears once per chunk)
        for c in out.outputs:
            j = c.index
            if self._is_done[j]:
                continue
            if self._held is None:
                text = c.text[self._num_chars[j]:]
                self._num_chars[j] = max(self._num_chars[j], len(c.text))
            else:
                text = self._held[j].content_delta(c.text)
            logprobs, self._num_tokens[j] = _logprobs(req, c, self._num_tokens[j], token_text)
            if text or (logprobs is not None and logprobs.content):
                deltas.append(ChatStreamChoice(index=j, delta=ChatDelta(content=text), logprobs=logprobs))
            if c.finished:
                self._is_done[j] = True
                calls: list[ParsedCall] = []
                if self._held is not None:
                    content, calls = self.task.tools.parse(c.text)
                    if rest := self._held[j].rest(content, c.text):
                        tails.append(ChatStreamChoice(index=j, delta=ChatDelta(content=rest)))
                    tails += _tool_call_deltas(j, calls)
                finishes.append(ChatStreamChoice(index=j, delta=ChatDelta(),
                                                 finish_reason="tool_calls" if calls else c.finish_reason))
        out_chunks = [self._chunk(deltas)] if deltas else []
        out_chunks += [self._chunk([tail]) for tail in tails]
        if finishes:
            out_chunks.append(self._chunk(finishes))
        return out_chunks

    def usage_chunk(self, out: RequestOutput) -> ChatCompletionChunk | None:
        """The last chunk with the request's usage, when the request asked for it."""
        return self._chunk([], usage([out])) if self.task.request.include_usage else None


def _tool_call_deltas(j: int, calls: list[ParsedCall]) -> list[ChatStreamChoice]:
    """OpenAI's streamed shape of choice j's calls: per call, id, type and name first, then the arguments."""
    out = []
    for k, call in enumerate(calls):
        out.append(ChatStreamChoice(index=j, delta=ChatDelta(tool_calls=[ToolCallDelta(
            index=k, id=call.id, type="function", function=FunctionCallDelta(name=call.name, arguments=""))])))
        out.append(ChatStreamChoice(index=j, delta=ChatDelta(tool_calls=[ToolCallDelta(
            index=k, function=FunctionCallDelta(arguments=call.arguments))])))
    return out
