"""Request: one sequence being generated, with its counters and status."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from roofline.engine.fair_share import DEFAULT_TENANT
from roofline.outputs import Logprob
from roofline.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    """Where a request is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again after losing its KV blocks (recompute) or with blocks swapped out
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        """True for the three finished states."""
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass
class Request:
    """One sequence: prompt, sampling settings, tokens so far and progress of its KV cache."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # resolved against the context limit
    eos_token_ids: list[int]
    priority: int = 0  # lower runs first
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when first scheduled
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    generator: torch.Generator | None = None  # per-request RNG when a seed was given
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] = field(default_factory=list)
    is_swapped: bool = False  # KV blocks live in CPU swap space
    parent_id: str | None = None  # for n > 1: the request whose prompt blocks this one shares
    sample_index: int = 0  # which of the parent's n samples this is
    first_token_time: float | None = None
    first_scheduled_time: float | None = None  # when it first entered the running batch
    finished_time: float | None = None  # when a stop condition ended it (not set on abort)
    tenant: str = DEFAULT_TENANT  # who sent it (an API key's name), for fair shares
    _token_ids: list[int] = field(default_factory=list, repr=False)  # prompt + output, appended as they grow

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt length."""
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by generated tokens: one list, extended by the new tokens only (do not mutate)."""
        if not self._token_ids:
            self._token_ids.extend(self.prompt_token_ids)
        num_known = len(self._token_ids) - len(self.prompt_token_ids)
        if num_known < len(self.output_token_ids):
            self._token_ids.extend(self.output_token_ids[num_known:])
        return self._token_ids

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens so far."""
        return len(self.output_token_ids)

    @property
    def ttft_deadline(self) -> float | None:
        """When the first token is due (monotonic seconds), or None without a TTFT target."""
        slo = self.sampling_params.slo
        if slo is None or slo.ttft_ms is None:
            return None
        return self.arrival_time + slo.ttft_ms / 1e3

    @property
    def tpot_target_s(self) -> float | None:
        """The mean time per output token asked for, in seconds, or None."""
        slo = self.sampling_params.slo
        return None if slo is None or slo.tpot_ms is None else slo.tpot_ms / 1e3

    @property
    def wants_prompt_logprobs(self) -> bool:
        """True when prompt logprobs were asked for (and so the prefix cache must be bypassed)."""
        return self.sampling_params.prompt_logprobs is not None

    @property
    def skips_prefix_cache(self) -> bool:
        """True when every prompt position must be computed: prompt logprobs, or a mean-pooled embedding."""
        return self.wants_prompt_logprobs or self.sampling_params.pooling == "mean"
