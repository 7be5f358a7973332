"""POST /tokenize and /detokenize (vLLM's request and response shapes), on the served model's tokenizer."""

from __future__ import annotations

import asyncio

from roofline.errors import InvalidRequestError
from roofline.openai.chat import conversation_of
from roofline.server.context import ServingContext
from roofline.server.errors import APIError
from roofline.server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from roofline.openai.sampling import check_model


async def tokenize(req: TokenizeRequest, ctx: ServingContext) -> TokenizeResponse:
    """The token ids the engine would see for this prompt or conversation."""
    check_model(req.model, ctx.config)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", code="invalid_value", param="prompt")
    tok = ctx.tokenizer

    def run() -> list[int]:
        if req.prompt is not None:
            return tok.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
        text = tok.apply_chat_template(conversation_of(req.messages), add_generation_prompt=req.add_generation_prompt)
        return tok.encode(text, add_special_tokens=bool(req.add_special_tokens))

    try:  # off the event loop: a long text takes a while
        ids = await asyncio.to_thread(run)
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), code="invalid_value", param="messages") from None
    strs = [tok.token_text(t) for t in ids] if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=ctx.max_model_len, tokens=ids, token_strs=strs)


async def detokenize(req: DetokenizeRequest, ctx: ServingContext) -> DetokenizeResponse:
    """The text of token ids (special tokens kept, as the engine saw them)."""
    check_model(req.model, ctx.config)
    vocab = ctx.engine.engine.model_config.vocab_size
    bad = next((i for i, t in enumerate(req.tokens) if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"tokens[{bad}] = {req.tokens[bad]} is not a token id of this model (0 to {vocab - 1})",
                       code="invalid_value", param="tokens")
    text = await asyncio.to_thread(ctx.tokenizer.decode, req.tokens, skip_special_tokens=False)
    return DetokenizeResponse(prompt=text)
