"""OpenAI-shaped request and response models (pydantic), plus roofline's documented extension fields.

Requests ignore fields they do not know (clients send many optional ones), but reject the ones they
know and cannot honour (tools, logit_bias, ...) rather than silently doing something else. Known fields
take JSON's types as they are, never coerced: see `_Request`.
Extension fields roofline adds to responses are left out of the JSON when they are unset, so a
response without them is field for field what OpenAI sends.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer

MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI allows
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 256  # each is checked on every generated token
LOGPROB_FLOOR = -9999.0  # what OpenAI reports for a token of (practically) zero probability


def _whole_numbers(value: Any) -> Any:
    """JSON has one number type: 2.0 is the integer 2 (as JSON Schema says); 2.5, "2" and true are not."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


def _takes_int(annotation: Any) -> bool:
    """True when a field's type has int in it (int, int | None, list[int], ...)."""
    return annotation is int or any(_takes_int(a) for a in get_args(annotation))


class _Request(BaseModel):
    """A request model: unknown fields ignored, known ones strictly typed and finite."""

    # strict: values are taken as sent, never coerced ("5", true and 5.5 are not integers, "yes" and 1 are not
    # booleans, "0.5" is not a number), as OpenAI rejects them; coercion let `"stream": "yes"` stream and made
    # `"max_tokens": true` 1. An integer is still a number (`"temperature": 1`), and a whole number is an
    # integer (`"max_tokens": 5.0`), as JSON Schema counts them.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _integers_may_be_whole_floats(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        return _whole_numbers(value) if field is not None and _takes_int(field.annotation) else value


class StreamOptions(_Request):
    """`stream_options`: whether the last SSE chunk carries the usage."""

    include_usage: bool = False


class SLOTarget(_Request):
    """`slo`: latency targets of one request, in milliseconds (docs/scheduling.md)."""

    ttft_ms: float | None = Field(None, gt=0.0, lt=1e9)  # time to first token
    tpot_ms: float | None = Field(None, gt=0.0, lt=1e9)  # mean time per output token after the first


class SamplingFields(_Request):
    """Sampling fields common to both generation routes (OpenAI's, then roofline's extensions)."""

    model: str | None = None  # optional here: the server serves one model
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # accepted only when empty
    # roofline extensions (vLLM users know these names)
    top_k: int | None = Field(None, ge=-1, lt=2**31)  # -1 or 0: off
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = Field(0, ge=-(2**31), lt=2**31)  # lower runs first
    slo: SLOTarget | None = None  # latency targets, honoured by `--scheduling slo`
    slo_class: str | None = Field(None, min_length=1, max_length=64)  # a class the server defines (--slo-class)
    processed_logprobs: bool = False  # also return each chosen token's logprob after sampling transforms
    # structured outputs (docs/structured-outputs.md): OpenAI's response_format, or one of roofline's constraints
    response_format: dict[str, Any] | None = None  # {"type": "text" | "json_object" | "json_schema", ...}
    guided_regex: str | None = None  # the whole output matches this regular expression
    guided_grammar: str | None = None  # the output derives from this EBNF grammar (xgrammar's, `root ::= ...`)

    def stop_list(self) -> list[str]:
        """`stop` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        """True when the stream should end with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # null: up to the context limit; 0 only with echo
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class TextPart(_Request):
    """One part of a message's content; only text parts are supported."""

    type: str
    text: str | None = None


class FunctionCallIn(_Request):
    """A function call an assistant message made: its name and its arguments as JSON text."""

    name: str
    arguments: str = "{}"


class ToolCallIn(_Request):
    """One of an assistant message's `tool_calls`."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Request):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant message that called tools
    tool_call_id: str | None = None  # a tool message: the call it answers


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None  # [{"type": "function", "function": {...}}], checked in openai/tools.py
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    parallel_tool_calls: bool | None = None  # "auto" may return several calls; "required" and a named choice one
    functions: list[Any] | None = None


# --- responses ------------------------------------------------------------------------------------


class _Response(BaseModel):
    """A response model; fields named in `_omit_if_none` (roofline extensions) vanish when None."""

    _omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_unset_extensions(self, handler):
        data = handler(self)
        for key in self._omit_if_none:
            if data.get(key, 0) is None:
                del data[key]
        return data


class UsageDetails(_Response):
    """`usage.prompt_tokens_details`."""

    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class Usage(_Response):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: UsageDetails | None = None


class CompletionLogprobs(_Response):
    """Logprobs of a /v1/completions choice (OpenAI's legacy shape)."""

    _omit_if_none = frozenset({"processed_token_logprobs"})

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)
    processed_token_logprobs: list[float | None] | None = None  # roofline extension


class CompletionChoice(_Response):
    """One choice of a completion (or of a streamed chunk)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(_Response):
    """A /v1/completions response or SSE chunk (both have object "text_completion")."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


class TopLogprob(_Response):
    """One alternative in a chat logprob entry."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(_Response):
    """Logprob of one generated token in a chat choice."""

    _omit_if_none = frozenset({"processed_logprob"})

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)
    processed_logprob: float | None = None  # roofline extension


class ChatLogprobs(_Response):
    """`choices[].logprobs` of a chat completion."""

    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class FunctionCall(_Response):
    """The function a tool call names, and its arguments as JSON text."""

    name: str
    arguments: str


class ToolCall(_Response):
    """A tool call of the assistant's message."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(_Response):
    """What a streamed chunk adds to a tool call's function."""

    _omit_if_none = frozenset({"name", "arguments"})

    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Response):
    """What a streamed chunk adds to one tool call (its first chunk carries id, type and name)."""

    _omit_if_none = frozenset({"id", "type", "function"})

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class ChatResponseMessage(_Response):
    """The assistant's message."""

    _omit_if_none = frozenset({"tool_calls"})

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Response):
    """One choice of a chat completion."""

    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionResponse(_Response):
    """A non-streamed chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(_Response):
    """What a streamed chunk adds to a choice's message."""

    _omit_if_none = frozenset({"role", "content", "refusal", "tool_calls"})

    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatStreamChoice(_Response):
    """One choice in a chat SSE chunk."""

    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionChunk(_Response):
    """A chat SSE chunk."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


class TokenizeRequest(_Request):
    """POST /tokenize (vLLM's shape): a `prompt`, or chat `messages` rendered through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (the template adds them)
    add_generation_prompt: bool = True  # messages only
    return_token_strs: bool = False


class TokenizeResponse(_Response):
    """The token ids of a /tokenize request."""

    _omit_if_none = frozenset({"token_strs"})

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    """POST /detokenize (vLLM's shape): token ids to text."""

    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


class DetokenizeResponse(_Response):
    """The text of a /detokenize request."""

    prompt: str


class EmbeddingRequest(_Request):
    """POST /v1/embeddings: OpenAI's fields, plus roofline's pooling, priority and slo_class."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]  # a text, texts, token ids, or token-id lists
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32 bytes, as OpenAI
    dimensions: int | None = Field(None, ge=1)  # keep the first entries and renormalize (at most the hidden size)
    user: str | None = None
    # roofline extensions
    pooling: Literal["last", "mean"] | None = None  # default "last": the last token's final normed hidden state
    priority: int = Field(0, ge=-(2**31), lt=2**31)  # lower runs first
    slo_class: str | None = Field(None, min_length=1, max_length=64)  # its priority applies (no latency targets)
    slo: ClassVar[None] = None  # embeddings have no first token or decode: no latency targets


class EmbeddingData(_Response):
    """One input's embedding."""

    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str  # floats, or their base64 (encoding_format)
    index: int


class EmbeddingUsage(_Response):
    """Token counts of an embeddings request (no completion tokens)."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(_Response):
    """The answer of POST /v1/embeddings, in input order."""

    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(_Response):
    """One entry of GET /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "roofline"
    max_model_len: int | None = None  # roofline extension: the context limit


class ModelList(_Response):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(_Response):
    """The body of OpenAI's error JSON."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorInfo
