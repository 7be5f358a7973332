"""POST /v1/embeddings: inputs -> embedding requests in the engine (prefill only); vectors -> OpenAI's JSON.

Every input runs as its own engine request (SamplingParams.pooling), chunked and batched with generation
like any prompt (engine/pooling.py); the request answers once all have finished, in input order.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter

from roofline.engine.pooling import truncate_embedding
from roofline.outputs import RequestOutput
from roofline.sampling_params import SamplingParams
from roofline.server.context import ServingContext
from roofline.server.errors import APIError
from roofline.server.generation import Prompt, engine_error
from roofline.server.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from roofline.openai.sampling import check_model, new_id
from roofline.server.slo import Job

MAX_INPUTS = 2048  # inputs per request, as OpenAI allows


class EmbeddingMetrics:
    """Counters of the embeddings route, in the app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.inputs = Counter("roofline_embedding_inputs", "Inputs embedded, by pooling.", ["pooling"],
                              registry=registry)
        self.tokens = Counter("roofline_embedding_prompt_tokens", "Tokens of the inputs embedded.", registry=registry)


def embedding_inputs(req: EmbeddingRequest, vocab_size: int) -> list[Prompt]:
    """`input` as a list of texts or token-id lists; an empty one or a foreign token id is a 400."""
    raw = req.input
    is_single = isinstance(raw, str) or bool(raw and isinstance(raw[0], int))
    if is_single:
        items: list[Prompt] = [raw if isinstance(raw, str) else list(raw)]
    else:
        items = list(raw)
    if not items:
        raise APIError(400, "input must not be empty; send a string, a list of strings or token ids",
                       code="invalid_value", param="input")
    if len(items) > MAX_INPUTS:
        raise APIError(400, f"at most {MAX_INPUTS} inputs are allowed per request, got {len(items)}",
                       code="invalid_value", param="input")
    for i, item in enumerate(items):
        where = "input" if is_single else f"input[{i}]"
        if not item:
            raise APIError(400, f"{where} is empty; every input needs at least one token", code="invalid_value",
                           param="input")
        if not isinstance(item, str):
            bad = next((t for t in item if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise APIError(400, f"{where} holds {bad}, not a token id of this model (0 to {vocab_size - 1})",
                               code="invalid_value", param="input")
    return items


def encode_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    """The vector as floats, or base64 of its little-endian float32 bytes (what OpenAI sends and its SDK reads)."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


async def _embed_all(ctx: ServingContext, inputs: Sequence[Prompt], params: SamplingParams, request_id: str,
                     job: Job) -> list[RequestOutput]:
    """Run every input through the engine at once; the first failure cancels (and aborts) the rest."""

    async def one(i: int, prompt: Prompt) -> RequestOutput:
        final = None
        async for out in ctx.engine.generate(prompt, params, f"{request_id}-{i}", priority=job.priority,
                                             tenant=job.tenant):
            final = out
        return final

    tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(inputs)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((t for t in tasks if t in done and t.exception() is not None), None)
        if failed is not None:
            exc = failed.exception()
            err = engine_error(exc, ctx.config.retry_after_s, param="input")
            raise err if err is not None else exc
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def create_embeddings(req: EmbeddingRequest, ctx: ServingContext, job: Job,
                            metrics: EmbeddingMetrics) -> EmbeddingResponse:
    """Embed every input of the request with the served model."""
    check_model(req.model, ctx.config)
    model_config = ctx.engine.engine.model_config
    hidden = model_config.hidden_size
    if req.dimensions is not None and req.dimensions > hidden:
        raise APIError(400, f"dimensions ({req.dimensions}) is larger than this model's embedding size ({hidden})",
                       code="invalid_value", param="dimensions")
    inputs = embedding_inputs(req, model_config.vocab_size)
    pooling = req.pooling or ctx.engine.engine.default_pooling
    outputs = await _embed_all(ctx, inputs, SamplingParams(pooling=pooling), new_id("embd"), job)
    data = [EmbeddingData(embedding=encode_embedding(truncate_embedding(out.embedding, req.dimensions),
                                                     req.encoding_format), index=i)
            for i, out in enumerate(outputs)]
    num_tokens = sum(len(out.prompt_token_ids) for out in outputs)
    metrics.inputs.labels(pooling).inc(len(outputs))
    metrics.tokens.inc(num_tokens)
    return EmbeddingResponse(data=data, model=ctx.config.model_name,
                             usage=EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens))
