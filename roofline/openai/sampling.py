"""Request fields -> SamplingParams, and the pieces both generation routes share (usage, logprob floor)."""

from __future__ import annotations

import math
import time
import uuid

from roofline.errors import InvalidRequestError
from roofline.outputs import RequestOutput
from roofline.sampling_params import SamplingParams
from roofline.server.config import ServerConfig
from roofline.openai.errors import APIError
from roofline.server.protocol import LOGPROB_FLOOR, MAX_STOP_STRINGS, SamplingFields, Usage, UsageDetails
from roofline.openai.structured import structured_spec

_SEED_RANGE = 2**63  # torch seeds are 64-bit; the engine adds the sample index for n > 1
_GREEDY_BELOW = 1e-5  # smaller temperatures overflow the scaled logits; they mean greedy anyway


def new_id(prefix: str) -> str:
    """A response id such as `chatcmpl-3f2a...`."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """`created`: Unix seconds."""
    return int(time.time())


def check_model(model: str | None, config: ServerConfig) -> None:
    """A 404 unless the request names the served model (or none)."""
    if not config.serves(model):
        raise APIError(404, f"the model {model!r} does not exist; this server serves {config.model_name!r} "
                            f"(see GET /v1/models)", code="model_not_found", param="model")


def check_request(req: SamplingFields, num_prompts: int, config: ServerConfig, has_logprobs: bool) -> None:
    """Reject what the engine cannot honour, with a message that says what to change."""
    check_model(req.model, config)
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported; leave it out", code="unsupported_parameter",
                       param="logit_bias")
    if len(req.stop_list()) > MAX_STOP_STRINGS:
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(req.stop_list())}",
                       code="invalid_value", param="stop")
    if num_prompts * req.n > config.max_choices:
        raise APIError(400, f"this request asks for {num_prompts * req.n} completions (prompts x n); the limit is "
                            f"{config.max_choices}", code="invalid_value", param="n")
    if req.processed_logprobs and not has_logprobs:
        raise APIError(400, "processed_logprobs needs logprobs to be requested too", code="invalid_value",
                       param="processed_logprobs")


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """SamplingParams for a request; invalid combinations become a 400."""
    try:
        return SamplingParams(
            n=req.n, max_tokens=max_tokens, temperature=_temperature(req.temperature),
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, min_p=req.min_p,
            seed=None if req.seed is None else req.seed % _SEED_RANGE, stop=req.stop_list(),
            stop_token_ids=req.stop_token_ids or [], ignore_eos=req.ignore_eos,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            processed_logprobs=req.processed_logprobs, skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output, structured=structured_spec(req))
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), code="invalid_value") from None


def _temperature(value: float | None) -> float:
    if value is None:
        return 1.0
    return 0.0 if value < _GREEDY_BELOW else value


def usage(outputs: list[RequestOutput], count_completion: bool = True) -> Usage:
    """Token counts of a request: each prompt once, every sample's generated tokens."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs) if count_completion else 0
    cached = sum(o.num_cached_tokens for o in outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=UsageDetails(cached_tokens=cached))


def finite_logprob(value: float | None) -> float | None:
    """JSON has no -inf: report impossible tokens as OpenAI does (-9999.0)."""
    if value is None:
        return None
    return value if math.isfinite(value) and value > LOGPROB_FLOOR else LOGPROB_FLOOR
