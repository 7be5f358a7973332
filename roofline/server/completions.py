"""POST /v1/completions over HTTP: the shared translation (openai/completions.py) on a GenerationStream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from roofline.openai.completions import CompletionTask, CompletionStreamer, completion_response as response_body
from roofline.openai.completions import plan_completion as plan_task
from roofline.openai.sampling import new_id, now
from roofline.server.context import ServingContext
from roofline.server.generation import GenerationStream
from roofline.server.protocol import CompletionResponse
from roofline.server.streaming import SSE_DONE, sse_event


@dataclass
class CompletionPlan:
    """A validated completion request and its GenerationStream."""

    task: CompletionTask
    stream: GenerationStream
    response_id: str
    created: int


def plan_completion(req, ctx: ServingContext) -> CompletionPlan:
    """Check a completion request and build its GenerationStream (not started)."""
    task = plan_task(req, ctx.config)
    rid = new_id("cmpl")
    stream = GenerationStream(ctx.engine, task.prompts, task.params, rid, req.priority, ctx.metrics,
                              ctx.config.retry_after_s, param="prompt")
    return CompletionPlan(task, stream, rid, now())


def completion_response(plan: CompletionPlan, ctx: ServingContext) -> CompletionResponse:
    """The JSON body once the stream finished."""
    outputs = [out for out in plan.stream.latest if out is not None]
    return response_body(plan.task, outputs, plan.response_id, plan.created, ctx.config.model_name, ctx.tokenizer)


async def completion_events(plan: CompletionPlan, ctx: ServingContext) -> AsyncIterator[bytes]:
    """SSE events for a started stream: text deltas per choice, then usage (if asked) and [DONE]."""
    streamer = CompletionStreamer(plan.task, plan.response_id, plan.created, ctx.config.model_name, ctx.tokenizer)
    async for i, out in plan.stream.events():
        if (body := streamer.chunk(i, out)) is not None:
            yield sse_event(body.model_dump_json())
    if (body := streamer.usage_chunk([o for o in plan.stream.latest if o is not None])) is not None:
        yield sse_event(body.model_dump_json())
    yield SSE_DONE
