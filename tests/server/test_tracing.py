"""OpenTelemetry traces (serve --otlp-traces-endpoint): one span per chat/completion request, with phases.

A live server on the default model exports to the SDK's InMemorySpanExporter; each test reads the spans
its own request produced (found by the response id).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import sys
import time

import pytest
from starlette.testclient import TestClient

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from roofline.cli import main  # noqa: E402
from roofline.server.tracing import OTEL_MISSING, RequestTracer, TracingMiddleware, otlp_traces_url  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
PHASES = ("queue", "prefill", "decode")


@pytest.fixture(scope="module")
def traced(start_server):
    """(live server, exporter): the default model served with tracing into memory."""
    from roofline import LLM

    exporter = InMemorySpanExporter()
    tracer = RequestTracer.with_exporter(exporter, batch=False)
    with start_server(LLM(model="default", kv_cache_memory=64 << 20),
                      app_options={"tracer": tracer}) as live:
        yield live, exporter
    tracer.shutdown()


def spans_of(exporter: InMemorySpanExporter, predicate, timeout: float = 10.0):
    """(request span, its child spans by name) for the first request span matching `predicate`."""
    deadline = time.monotonic() + timeout
    while True:  # the span ends just after the answer's last byte, so it may lag the client a little
        spans = exporter.get_finished_spans()
        roots = [s for s in spans if s.kind == SpanKind.SERVER and predicate(s)]
        if roots:
            root = roots[0]
            children = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id}
            return root, children
        assert time.monotonic() < deadline, "no span for the request"
        time.sleep(0.02)


def by_response_id(response_id: str):
    return lambda s: s.attributes.get("gen_ai.response.id") == response_id


def assert_phases_in_order(root, children) -> None:
    assert set(PHASES) <= set(children)
    queue, prefill, decode = (children[p] for p in PHASES)
    assert root.start_time <= queue.start_time <= queue.end_time == prefill.start_time
    assert prefill.start_time <= prefill.end_time == decode.start_time <= decode.end_time <= root.end_time


def test_a_chat_request_is_one_span_with_phases_and_counts(traced):
    live, exporter = traced
    with live.client() as http:
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Say hi"}],
                                                    "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    root, children = spans_of(exporter, by_response_id(body["id"]))
    assert root.name == f"chat {live.model}"
    assert root.parent is None  # no traceparent sent: a new trace
    attrs = root.attributes
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.response.model"] == live.model
    assert attrs["gen_ai.usage.input_tokens"] == body["usage"]["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == body["usage"]["completion_tokens"]
    assert tuple(attrs["gen_ai.response.finish_reasons"]) == (body["choices"][0]["finish_reason"],)
    assert attrs["gen_ai.request.max_tokens"] == 5
    assert attrs["http.response.status_code"] == 200
    assert root.status.status_code == StatusCode.UNSET
    assert_phases_in_order(root, children)
    assert children["prefill"].attributes["gen_ai.usage.input_tokens"] == body["usage"]["prompt_tokens"]
    assert children["decode"].attributes["gen_ai.usage.output_tokens"] == body["usage"]["completion_tokens"]


def test_traceparent_makes_the_request_a_child_of_the_callers_trace(traced):
    live, exporter = traced
    with live.client(headers={"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"}) as http:
        r = http.post("/v1/completions", json={"prompt": "The sky is", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200
    root, children = spans_of(exporter, by_response_id(r.json()["id"]))
    assert root.name == f"text_completion {live.model}"
    assert format(root.context.trace_id, "032x") == TRACE_ID
    assert format(root.parent.span_id, "016x") == PARENT_SPAN_ID
    assert root.parent.is_remote
    assert all(c.context.trace_id == root.context.trace_id for c in children.values())


def test_a_streamed_completion_is_traced_when_its_stream_ends(traced):
    live, exporter = traced
    with live.client() as http:
        with http.stream("POST", "/v1/completions", json={
                "prompt": "One, two,", "max_tokens": 6, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200
            events = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
    usage = events[-1]["usage"]
    root, children = spans_of(exporter, by_response_id(events[0]["id"]))
    assert root.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert root.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert root.status.status_code == StatusCode.UNSET
    assert_phases_in_order(root, children)


def test_a_client_that_leaves_mid_stream_is_an_error(traced):
    live, exporter = traced
    with live.client() as http:
        with http.stream("POST", "/v1/completions", json={
                "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
            first = json.loads(next(line for line in r.iter_lines() if line.startswith("data: "))[6:])
    root, children = spans_of(exporter, by_response_id(first["id"]))
    assert root.status.status_code == StatusCode.ERROR
    assert root.attributes["error.type"] == "client_disconnected"
    assert root.attributes["gen_ai.response.finish_reasons"] == ()  # it never finished
    assert 0 < root.attributes["gen_ai.usage.output_tokens"] < 200
    assert {"queue", "prefill", "decode"} <= set(children)  # the decode phase ends where the span does
    assert children["decode"].end_time <= root.end_time
    live.wait_idle()


def test_a_request_the_engine_refuses_records_an_error(traced):
    live, exporter = traced
    long_prompt = list(range(100, 100 + live.ctx.max_model_len))  # no room left for a generated token
    with live.client(headers={"traceparent": f"00-{TRACE_ID}-{'1' * 16}-01"}) as http:
        r = http.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 1, "stream": True})
    assert r.status_code == 400
    root, children = spans_of(exporter, lambda s: s.parent is not None and s.parent.span_id == int("1" * 16, 16))
    assert root.status.status_code == StatusCode.ERROR
    assert "context limit" in root.status.description
    assert root.attributes["error.type"] == "context_length_exceeded"
    assert root.attributes["http.response.status_code"] == 400
    assert "decode" not in children  # nothing was generated


def test_a_request_refused_before_the_engine_records_an_error(traced):
    live, exporter = traced
    with live.client(headers={"traceparent": f"00-{TRACE_ID}-{'2' * 16}-01"}) as http:
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                    "temperature": -1})
    assert r.status_code == 400
    root, _ = spans_of(exporter, lambda s: s.parent is not None and s.parent.span_id == int("2" * 16, 16))
    assert root.status.status_code == StatusCode.ERROR
    assert "temperature" in root.status.description


def test_untraced_routes_make_no_span(traced):
    live, exporter = traced
    with live.client() as http:
        assert http.get("/v1/models").status_code == 200
    assert not [s for s in exporter.get_finished_spans() if s.attributes.get("url.path") == "/v1/models"]


def test_otlp_url_gets_the_traces_path_when_bare():
    assert otlp_traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert otlp_traces_url("https://x.example/custom/path") == "https://x.example/custom/path"
    with pytest.raises(ValueError, match="http"):
        otlp_traces_url("collector:4318")


def test_the_flag_without_opentelemetry_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    assert main(["serve", "--otlp-traces-endpoint", "http://127.0.0.1:4318", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"roofline: error: {OTEL_MISSING}"
    assert "pip install 'roofline[otel]'" in err


def test_without_a_tracer_no_request_is_traced(traced):
    from roofline.server import create_app

    live, exporter = traced
    app = create_app(live.ctx.engine, live.ctx.config)  # the same engine, tracing off
    num_spans = len(exporter.get_finished_spans())
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                        headers={"Authorization": f"Bearer {live.api_keys[0]}"})
        assert r.status_code == 200
    assert len(exporter.get_finished_spans()) == num_spans
    assert not any(m.cls is TracingMiddleware for m in app.user_middleware)


@pytest.mark.parametrize("module", ["roofline.server.tracing", "roofline.server.app", "roofline.server.generation",
                                    "roofline.server.commands", "roofline.cli"])
def test_opentelemetry_is_imported_only_when_asked_for(module):
    """No module on the serving path imports opentelemetry at import time; only the flag's code paths do."""
    tree = ast.parse(inspect.getsource(importlib.import_module(module)))
    for node in tree.body:  # module level only; `if TYPE_CHECKING:` blocks are skipped, they never run
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(n.startswith("opentelemetry") for n in names), (module, names)
