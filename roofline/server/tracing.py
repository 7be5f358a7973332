"""OpenTelemetry traces of chat and completion requests (`roofline serve --otlp-traces-endpoint URL`).

Opt-in: without the flag nothing here imports opentelemetry and no request pays for tracing. With it,
TracingMiddleware opens a SERVER span per POST /v1/completions and /v1/chat/completions, as a child of
the incoming W3C `traceparent` when there is one, and publishes the request's RequestTrace in a context
variable; the request's GenerationStream registers itself there. When the answer is sent, the span gets
child spans `queue`, `prefill` and `decode` per prompt, placed at the engine's own timestamps
(RequestOutput.arrival_time, first_scheduled_time, first_token_time, finished_time), and the GenAI
attributes: token counts, model, finish reasons, response id.

Export is OTLP over HTTP/protobuf: it needs no gRPC runtime (grpcio is a large compiled wheel) and is
the protocol the OTLP spec recommends by default; collectors listen for it on port 4318.
"""

from __future__ import annotations

import contextvars
import json
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from roofline import __version__
from roofline.errors import RooflineError

if TYPE_CHECKING:  # only for annotations: importing opentelemetry is what the flag opts into
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span

    from roofline.outputs import RequestOutput
    from roofline.server.generation import GenerationStream

OTEL_MISSING = ("--otlp-traces-endpoint needs OpenTelemetry, which is not installed: "
                "pip install 'roofline[otel]'")
OTLP_TRACES_PATH = "/v1/traces"
TRACED_ROUTES = {"/v1/completions": "text_completion", "/v1/chat/completions": "chat"}  # path -> GenAI operation
_MAX_ERROR_BODY = 8192  # bytes of an error answer kept to read its message
CLIENT_CLOSED = 499  # the status app.py answers a request whose client left (it never reaches the client)

# the trace of the HTTP request being handled; a context variable because asyncio copies it into the tasks the
# handler starts, so the GenerationStream built deep in a handler finds its request's trace without plumbing
_current: contextvars.ContextVar[RequestTrace | None] = contextvars.ContextVar("roofline_trace", default=None)


def current_trace() -> RequestTrace | None:
    """The trace of the request being handled, or None (tracing off, or not a traced route)."""
    return _current.get()


def otlp_traces_url(url: str) -> str:
    """The OTLP/HTTP traces URL for --otlp-traces-endpoint: http(s) only; a bare host gets /v1/traces."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RooflineError(f"--otlp-traces-endpoint {url!r}: give an http(s) URL such as "
                            f"http://localhost:4318{OTLP_TRACES_PATH}")
    if parts.path in ("", "/"):
        return url.rstrip("/") + OTLP_TRACES_PATH
    return url


def _epoch_offset_ns() -> int:
    """Add to time.monotonic_ns() to get time.time_ns(): span times are wall-clock, engine times monotonic."""
    return time.time_ns() - time.monotonic_ns()


class RequestTracer:
    """Spans of traced requests, on roofline's own TracerProvider (the global one is left alone)."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = provider.get_tracer("roofline", __version__)
        self.propagator = TraceContextTextMapPropagator()

    @classmethod
    def with_exporter(cls, exporter: SpanExporter, batch: bool = True) -> RequestTracer:
        """A tracer sending spans to `exporter`: in batches off the request path, or one by one (tests)."""
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES still apply; "roofline" is only the default name
        resource = Resource.create({} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "roofline"})
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
        return cls(provider)

    @classmethod
    def to_otlp(cls, url: str) -> RequestTracer:
        """A tracer exporting over OTLP/HTTP to `url`; a one-line RooflineError if OpenTelemetry is missing."""
        endpoint = otlp_traces_url(url)
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace import TracerProvider  # noqa: F401  (the SDK, not only the API)
        except ImportError:
            raise RooflineError(OTEL_MISSING) from None
        return cls.with_exporter(OTLPSpanExporter(endpoint=endpoint))

    def shutdown(self) -> None:
        """Send the spans still buffered and stop exporting."""
        self.provider.shutdown()


@dataclass
class RequestTrace:
    """One traced HTTP request: its span, the streams it ran, and what went wrong, if anything."""

    span: Span
    offset_ns: int  # monotonic -> epoch nanoseconds
    streams: list[GenerationStream] = field(default_factory=list)
    error: tuple[str, str] | None = None  # (error.type, message)

    def add_stream(self, stream: GenerationStream) -> None:
        """Called by a GenerationStream made while handling this request."""
        self.streams.append(stream)

    def record_error(self, exc: BaseException) -> None:
        """The engine or the server failed this request (also mid-stream, after a 200 went out)."""
        code = getattr(exc, "code", None) or type(exc).__name__
        self.error = (code, getattr(exc, "message", None) or str(exc))

    def epoch_ns(self, monotonic_s: float) -> int:
        """An engine timestamp (time.monotonic() seconds) as span time."""
        return int(monotonic_s * 1e9) + self.offset_ns


def _phase_bounds(out: RequestOutput) -> list[tuple[str, float | None, float | None]]:
    """(phase, start, end) in engine time; None where the request has not got that far."""
    return [("queue", out.arrival_time, out.first_scheduled_time),
            ("prefill", out.first_scheduled_time, out.first_token_time),
            ("decode", out.first_token_time, out.finished_time)]


def _error_of(body: bytes, status: int) -> tuple[str, str]:
    try:
        err = json.loads(body)["error"]
        return str(err.get("code") or status), str(err["message"])
    except (ValueError, KeyError, TypeError):
        return str(status), f"HTTP {status}"


class TracingMiddleware:
    """Opens a span per chat/completion request and closes it, with phases and counts, once answered."""

    def __init__(self, app: ASGIApp, tracer: RequestTracer, model_name: str) -> None:
        self.app = app
        self.tracer = tracer
        self.model_name = model_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        operation = TRACED_ROUTES.get(scope.get("path", "")) if scope["type"] == "http" else None
        if operation is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        from opentelemetry.trace import SpanKind

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        offset_ns = _epoch_offset_ns()
        span = self.tracer.tracer.start_span(
            f"{operation} {self.model_name}", context=self.tracer.propagator.extract(headers), kind=SpanKind.SERVER,
            start_time=time.monotonic_ns() + offset_ns,
            attributes={"gen_ai.operation.name": operation, "gen_ai.response.model": self.model_name,
                        "http.request.method": "POST", "url.path": scope["path"], "http.route": scope["path"]})
        trace = RequestTrace(span, offset_ns)
        status = 500
        error_body = bytearray()

        async def send_watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400 and len(error_body) < _MAX_ERROR_BODY:
                error_body.extend(message.get("body", b"")[:_MAX_ERROR_BODY])
            await send(message)

        token = _current.set(trace)
        try:
            await self.app(scope, receive, send_watched)
        except BaseException as exc:
            trace.record_error(exc)
            raise
        finally:
            _current.reset(token)
            if status == CLIENT_CLOSED and trace.error is None:
                trace.error = ("client_disconnected", "the client left before the request finished")
            elif status >= 400 and trace.error is None:
                trace.error = _error_of(bytes(error_body), status)
            self._end(trace, status)

    def _end(self, trace: RequestTrace, status: int) -> None:
        """Phases, counts and status onto the span, then end it."""
        from opentelemetry.trace import StatusCode, set_span_in_context

        span = trace.span
        parent = set_span_in_context(span)
        outputs = [(i, out) for s in trace.streams for i, out in enumerate(s.latest) if out is not None]
        num_prompt_tokens = num_output_tokens = num_cached_tokens = 0
        finish_reasons: list[str] = []
        is_complete = bool(outputs)
        for i, out in outputs:
            num_prompt = len(out.prompt_token_ids)
            num_output = sum(len(c.token_ids) for c in out.outputs)
            num_prompt_tokens += num_prompt
            num_output_tokens += num_output
            num_cached_tokens += out.num_cached_tokens
            finish_reasons += [c.finish_reason for c in out.outputs if c.finish_reason is not None]
            is_complete &= out.finished
            counts = {"queue": {}, "prefill": {"gen_ai.usage.input_tokens": num_prompt,
                                               "roofline.usage.cached_tokens": out.num_cached_tokens},
                      "decode": {"gen_ai.usage.output_tokens": num_output}}
            for name, begin, end in _phase_bounds(out):
                if begin is None:
                    continue
                # a phase cut short (client gone) ends where the span ends
                end_ns = trace.epoch_ns(end) if end is not None else time.monotonic_ns() + trace.offset_ns
                child = self.tracer.tracer.start_span(name, context=parent, start_time=trace.epoch_ns(begin),
                                                      attributes={"roofline.prompt_index": i, **counts[name]})
                child.end(end_time=end_ns)
        attributes: dict[str, Any] = {
            "http.response.status_code": status, "gen_ai.usage.input_tokens": num_prompt_tokens,
            "gen_ai.usage.output_tokens": num_output_tokens, "roofline.usage.cached_tokens": num_cached_tokens,
            "gen_ai.response.finish_reasons": finish_reasons}
        if trace.streams:
            stream = trace.streams[0]
            params = stream.params
            attributes.update({"gen_ai.response.id": stream.request_id, "gen_ai.request.choice.count": params.n,
                               "gen_ai.request.temperature": params.temperature, "gen_ai.request.top_p": params.top_p,
                               "roofline.request.num_prompts": len(stream.prompts)})
            if params.max_tokens is not None:
                attributes["gen_ai.request.max_tokens"] = params.max_tokens
            if params.seed is not None:
                attributes["gen_ai.request.seed"] = params.seed
        span.set_attributes(attributes)
        if trace.error is None and outputs and not is_complete:
            trace.error = ("client_disconnected", "the client left before the request finished")
        if trace.error is not None:
            span.set_attribute("error.type", trace.error[0])
            span.set_status(StatusCode.ERROR, trace.error[1])
        span.end(end_time=time.monotonic_ns() + trace.offset_ns)
