"""create_app: the FastAPI app. Handlers parse, hand the request to the engine, and shape the answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from roofline import __version__
from roofline.engine.async_engine import AsyncEngine
from roofline.server.chat import chat_events, chat_response, plan_chat
from roofline.server.completions import completion_events, completion_response, plan_completion
from roofline.server.config import ServerConfig
from roofline.server.context import ServingContext
from roofline.server.dashboard import DashboardSampler
from roofline.server.embeddings import EmbeddingMetrics, create_embeddings
from roofline.server.errors import APIError, install_error_handlers
from roofline.server.generation import GenerationStream
from roofline.server.metrics import CONTENT_TYPE, ServerMetrics
from roofline.server.middleware import API_PREFIX, GUARDED_PATHS, GuardMiddleware
from roofline.server.slo import Job, resolve_job
from roofline.server.protocol import (ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                                      CompletionRequest, CompletionResponse, DetokenizeRequest, DetokenizeResponse,
                                      EmbeddingRequest, EmbeddingResponse, ErrorResponse, ModelCard, ModelList,
                                      TokenizeRequest, TokenizeResponse)
from roofline.server.streaming import ClientGone, EventStreamResponse, until_disconnected
from roofline.server.tokenize import detokenize, tokenize
from roofline.server.profiling import ProfilingConfig, install_profiling
from roofline.server.tracing import RequestTracer, TracingMiddleware
from roofline.server.ui import install_ui

M = TypeVar("M", bound=BaseModel)
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection"; only ever seen in metrics
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
_SCHEMA_REF = "#/components/schemas/{model}"
# parsed by parse_body, so FastAPI does not see them
_REQUEST_MODELS = (CompletionRequest, ChatCompletionRequest, EmbeddingRequest, TokenizeRequest, DetokenizeRequest)
_HEALTH_BODY = {"application/json": {"schema": {"type": "object", "required": ["status"], "properties": {
    "status": {"type": "string", "enum": ["ok", "draining", "engine stopped"]}}}}}


async def parse_body(request: Request, model: type[M]) -> M:
    """The request body as `model`; anything malformed is a 400 that says what was wrong."""
    raw = await request.body()
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {exc.start})", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    except ValueError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = ".".join(str(x) for x in err["loc"] if isinstance(x, int) or (x.isidentifier() and x not in _TYPE_TAGS))
        raise APIError(400, f"{param or 'body'}: {err['msg']}", code="invalid_value", param=param or None) from None
    try:  # JSON may smuggle in lone surrogates ("\ud800"), which no tokenizer accepts
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    except UnicodeEncodeError:
        raise APIError(400, "the request contains an invalid Unicode string (a lone surrogate escape)",
                       code="invalid_value") from None
    return parsed


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


async def _respond(request: Request, stream: GenerationStream, is_streaming: bool,
                   body: Callable[[], BaseModel], events: Callable[[], AsyncIterator[bytes]]) -> Response:
    """Run a generation; stop it as soon as the client disconnects, streaming or not."""
    await stream.__aenter__()
    try:
        # a stream starts only once every prompt produced its first token, so input errors still get a status
        await until_disconnected(request.receive, stream.wait_started() if is_streaming else stream.final())
    except ClientGone:
        await stream.aclose()
        return Response(status_code=CLIENT_CLOSED)
    except BaseException:
        await stream.aclose()
        raise
    if not is_streaming:
        await stream.aclose()
        return _json(body())
    return EventStreamResponse(events(), on_close=stream.aclose)


def job_of(req, request: Request, config: ServerConfig) -> Job:
    """Priority, latency targets and tenant of a generation request (server classes and tenants applied)."""
    return resolve_job(req, config.slo_classes, config.tenants, bool(config.api_keys),
                       request.headers.get("authorization", "").encode() or None)


def _documented(response: type[BaseModel], body: type[BaseModel] | None = None,
                chunk: type[BaseModel] | None = None) -> dict:
    """Route keywords that put in the OpenAPI schema what a handler does itself: its body, its answer, errors."""
    answer: dict = {"model": response}
    if chunk is not None:
        answer["content"] = {"text/event-stream": {"schema": {
            "type": "string", "description": f"with stream: true, events `data: <{chunk.__name__}>`, then "
                                            f"`data: [DONE]`"}}}
    # "default" also keeps FastAPI from documenting a 422 that our own error shape never produces
    keywords: dict = {"responses": {200: answer, "default": {"model": ErrorResponse,
                                                             "description": "any error: OpenAI's error JSON"}}}
    if body is not None:
        keywords["openapi_extra"] = {"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": _SCHEMA_REF.format(model=body.__name__)}}}}}
    return keywords


def openapi_schema(app: FastAPI, config: ServerConfig) -> dict:
    """FastAPI's schema of the routes, plus the request models and, when API keys are set, Bearer auth on /v1."""
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    _, defs = models_json_schema([(m, "validation") for m in _REQUEST_MODELS], ref_template=_SCHEMA_REF)
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {}).update(defs["$defs"])
    if config.api_keys:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, operations in schema["paths"].items():
            if path.startswith(API_PREFIX) or path in GUARDED_PATHS:
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
    return schema


def create_app(engine: AsyncEngine, config: ServerConfig, tracer: RequestTracer | None = None,
               profiling: ProfilingConfig | None = None) -> FastAPI:
    """The OpenAI-compatible app over a running AsyncEngine (which the caller owns and shuts down).

    `tracer`: spans of chat/completion requests (--otlp-traces-endpoint); `profiling`: POST /debug/profile.
    """
    metrics = ServerMetrics(engine)
    ctx = ServingContext(engine, config, metrics)
    dashboard = DashboardSampler(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        sampler = asyncio.create_task(metrics.sample_batch_size())
        dashboard_sampler = asyncio.create_task(dashboard.run())
        try:
            yield
        finally:
            sampler.cancel()
            dashboard_sampler.cancel()

    app = FastAPI(title="roofline", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  generate_unique_id_function=lambda route: route.name)  # operationIds: the handlers' names
    app.state.ctx = ctx
    install_error_handlers(app)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_schema(app, config)
        return app.openapi_schema

    app.openapi = openapi

    @app.post("/v1/completions", **_documented(CompletionResponse, CompletionRequest, chunk=CompletionResponse))
    async def create_completion(request: Request) -> Response:
        req = await parse_body(request, CompletionRequest)
        plan = plan_completion(req, ctx)
        plan.stream.assign(job_of(req, request, config))
        return await _respond(request, plan.stream, req.stream, lambda: completion_response(plan, ctx),
                              lambda: completion_events(plan, ctx))

    @app.post("/v1/chat/completions",
              **_documented(ChatCompletionResponse, ChatCompletionRequest, chunk=ChatCompletionChunk))
    async def create_chat_completion(request: Request) -> Response:
        req = await parse_body(request, ChatCompletionRequest)
        plan = await plan_chat(req, ctx)
        plan.stream.assign(job_of(req, request, config))
        return await _respond(request, plan.stream, req.stream, lambda: chat_response(plan, ctx),
                              lambda: chat_events(plan, ctx))

    embedding_metrics = EmbeddingMetrics(metrics.registry)

    @app.post("/v1/embeddings", **_documented(EmbeddingResponse, EmbeddingRequest))
    async def create_embedding(request: Request) -> Response:
        req = await parse_body(request, EmbeddingRequest)
        work = create_embeddings(req, ctx, job_of(req, request, config), embedding_metrics)
        try:  # a client that leaves aborts its inputs' engine requests
            return _json(await until_disconnected(request.receive, work))
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)

    @app.get("/v1/models", **_documented(ModelList))
    async def list_models() -> Response:
        card = ModelCard(id=config.model_name, created=config.created, max_model_len=ctx.max_model_len)
        return _json(ModelList(data=[card]))

    @app.get("/v1/models/{model:path}", **_documented(ModelCard))
    async def retrieve_model(model: str) -> Response:
        if model != config.model_name and model not in config.model_aliases:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {config.model_name!r}",
                           code="model_not_found", param="model")
        return _json(ModelCard(id=config.model_name, created=config.created, max_model_len=ctx.max_model_len))

    @app.post("/tokenize", **_documented(TokenizeResponse, TokenizeRequest))
    async def tokenize_text(request: Request) -> Response:
        return _json(await tokenize(await parse_body(request, TokenizeRequest), ctx))

    @app.post("/detokenize", **_documented(DetokenizeResponse, DetokenizeRequest))
    async def detokenize_tokens(request: Request) -> Response:
        return _json(await detokenize(await parse_body(request, DetokenizeRequest), ctx))

    @app.get("/health", responses={200: {"content": _HEALTH_BODY},
                                   503: {"description": "draining, or the engine stopped", "content": _HEALTH_BODY}})
    async def health() -> JSONResponse:
        if not engine.is_alive():
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        if ctx.drain.is_draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    install_ui(app, ctx, dashboard)  # GET /, /dashboard, /dashboard/stats, /static/*
    if profiling is not None:
        install_profiling(app, ctx, profiling)  # POST /debug/profile
    app.add_middleware(GuardMiddleware, ctx=ctx, routes=tuple(app.routes))
    if tracer is not None:  # added last, so outermost: refusals (401, 413, 429, 503) are traced too
        app.add_middleware(TracingMiddleware, tracer=tracer, model_name=config.model_name)
    return app
