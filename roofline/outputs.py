"""What a request returns: RequestOutput with one CompletionOutput per sample, and Logprob entries."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Log-probability of a token under the raw model distribution, and its rank there (1 = most likely)."""

    logprob: float
    rank: int
    decoded_token: str | None = None
    processed_logprob: float | None = None  # after temperature/penalties/top-k/top-p/min-p, when asked for


# one dict per token position: token id -> Logprob (the chosen token is always present)
LogprobsList = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    """One generated sequence."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: LogprobsList | None = None
    finish_reason: str | None = None  # "stop" or "length"; None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it

    @property
    def finished(self) -> bool:
        """True once a stop condition was met."""
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request: prompt, per-sample outputs, and whether it is done."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    queue_time: float | None = None  # seconds from arrival until first scheduled; None while still queued
    # engine timestamps (time.monotonic() seconds; the first sample's, the last to finish for finished_time) that
    # traces split into queue, prefill and decode phases; None until reached
    arrival_time: float | None = None  # the engine took the request
    first_scheduled_time: float | None = None  # it first entered the running batch: the queue phase ends
    first_token_time: float | None = None  # its first token was sampled: the prefill phase ends
    finished_time: float | None = None  # its last sample stopped: the decode phase ends
    embedding: list[float] | None = None  # an embedding request's L2-normalized pooled vector, once finished

    @property
    def prefill_time(self) -> float | None:
        """Seconds from first scheduled to the first token; None until then."""
        if self.first_scheduled_time is None or self.first_token_time is None:
            return None
        return self.first_token_time - self.first_scheduled_time

    @property
    def decode_time(self) -> float | None:
        """Seconds from the first token to the finish; None until finished."""
        if self.first_token_time is None or self.finished_time is None:
            return None
        return self.finished_time - self.first_token_time
