"""SamplingParams: how to pick tokens and when to stop, validated on construction."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from roofline.errors import InvalidRequestError

MAX_LOGPROBS = 20  # top-N alternatives returned per token, as OpenAI allows
STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "grammar")


@dataclass(frozen=True)
class StructuredSpec:
    """A constraint the output text must follow, enforced token by token (docs/structured-outputs.md).

    kind "json_schema": `value` is the schema as JSON text; "json_object": any JSON object (`value` None);
    "regex": a regular expression the whole output matches; "grammar": an EBNF grammar (xgrammar's
    GBNF-style syntax, `root ::= ...`). Frozen and hashable: compiled grammars are cached by spec.
    """

    kind: str
    value: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise InvalidRequestError(f"structured output kind must be one of {', '.join(STRUCTURED_KINDS)}, "
                                      f"got {self.kind!r}")
        if self.kind == "json_object":
            if self.value is not None:
                raise InvalidRequestError("a json_object constraint takes no value")
        elif not isinstance(self.value, str) or not self.value:
            raise InvalidRequestError(f"a {self.kind} constraint needs a non-empty string")

    @classmethod
    def json(cls, schema: dict[str, Any] | str) -> StructuredSpec:
        """Output must be JSON valid against `schema` (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise InvalidRequestError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequestError("a JSON schema must be a JSON object")
        return cls("json_schema", json.dumps(schema))  # key order kept: properties come out in it

    @classmethod
    def json_object(cls) -> StructuredSpec:
        """Output must be one JSON object (any keys)."""
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> StructuredSpec:
        """Output must match `pattern` as a whole."""
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, ebnf: str) -> StructuredSpec:
        """Output must derive from the EBNF grammar's `root` rule."""
        return cls("grammar", ebnf)


@dataclass(frozen=True)
class SLO:
    """Latency targets of one request: time to first token and mean time per output token, in ms."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise InvalidRequestError(f"slo.{name} must be a number of milliseconds > 0, got {value!r}")

    @property
    def is_empty(self) -> bool:
        """True when neither target is set."""
        return self.ttft_ms is None and self.tpot_ms is None


@dataclass
class SamplingParams:
    """Sampling and stopping settings for one request (the shape vLLM users know)."""

    n: int = 1  # completions per prompt
    max_tokens: int | None = 16  # None: up to the context limit
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None  # makes sampling reproducible
    stop: list[str] = field(default_factory=list)  # stop strings, not included in the output
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # top-N logprobs per generated token (the chosen one always included)
    prompt_logprobs: int | None = None  # top-N logprobs per prompt token
    processed_logprobs: bool = False  # also report the chosen token's logprob after temperature/top-k/top-p
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured: StructuredSpec | None = None  # output constraint (JSON schema, regex, grammar), enforced per token
    slo: SLO | None = None  # latency targets, honoured by the scheduler in "slo" mode (docs/scheduling.md)
    pooling: str | None = None  # "last" or "mean": an embedding request (prefill only, no sampling; engine/pooling.py)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.slo, dict):
            self.slo = SLO(**self.slo)
        if self.slo is not None and self.slo.is_empty:
            self.slo = None
        checks = [
            (isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n}"),
            (self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             f"max_tokens must be an integer >= 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
            (self.structured is None or isinstance(self.structured, StructuredSpec),
             "structured must be a StructuredSpec (StructuredSpec.json(schema), .regex(...), ...)"),
            (self.pooling in (None, "last", "mean"), f"pooling must be 'last' or 'mean', got {self.pooling!r}"),
            (self.pooling is None or (self.n == 1 and self.structured is None and self.logprobs is None
                                      and self.prompt_logprobs is None),
             "an embedding request (pooling) takes no n, structured output or logprobs"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)

    @property
    def is_greedy(self) -> bool:
        """Temperature 0: always the most likely token."""
        return self.temperature == 0.0
