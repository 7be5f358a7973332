"""POST /v1/chat/completions over HTTP: the shared translation (openai/chat.py) on a GenerationStream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from roofline.openai.chat import ChatStreamer, ChatTask, chat_response as response_body, plan_chat as plan_task
from roofline.openai.sampling import new_id, now
from roofline.server.context import ServingContext
from roofline.server.generation import GenerationStream
from roofline.server.protocol import ChatCompletionRequest, ChatCompletionResponse
from roofline.server.streaming import SSE_DONE, sse_event


@dataclass
class ChatPlan:
    """A validated chat request and its GenerationStream."""

    task: ChatTask
    stream: GenerationStream
    response_id: str
    created: int


async def plan_chat(req: ChatCompletionRequest, ctx: ServingContext) -> ChatPlan:
    """Check a chat request, render its prompt (off the event loop) and build its GenerationStream (not started)."""
    task = await asyncio.to_thread(plan_task, req, ctx.config, ctx.tokenizer, ctx.max_model_len)
    rid = new_id("chatcmpl")
    stream = GenerationStream(ctx.engine, [task.prompt_ids], task.params, rid, req.priority, ctx.metrics,
                              ctx.config.retry_after_s, param="messages")
    return ChatPlan(task, stream, rid, now())


def chat_response(plan: ChatPlan, ctx: ServingContext) -> ChatCompletionResponse:
    """The JSON body once the stream finished."""
    return response_body(plan.task, plan.stream.latest[0], plan.response_id, plan.created, ctx.config.model_name,
                         ctx.tokenizer)


async def chat_events(plan: ChatPlan, ctx: ServingContext) -> AsyncIterator[bytes]:
    """SSE events for a started stream: a role chunk, content deltas, a finish chunk per choice, usage, [DONE]."""
    streamer = ChatStreamer(plan.task, plan.response_id, plan.created, ctx.config.model_name, ctx.tokenizer)
    yield sse_event(streamer.first_chunk().model_dump_json())
    async for _, out in plan.stream.events():
        for body in streamer.chunks(out):
            yield sse_event(body.model_dump_json())
    if (body := streamer.usage_chunk(plan.stream.latest[0])) is not None:
        yield sse_event(body.model_dump_json())
    yield SSE_DONE
