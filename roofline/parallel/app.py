"""create_router_app: the front end's routes, each handed to ReplicaProxy; /health and /metrics of its own."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from roofline import __version__
from roofline.parallel.proxy import CLIENT_CLOSED, ReplicaProxy, RouterContext
from roofline.parallel.replicas import ReplicaSupervisor
from roofline.parallel.router import RequestCost, estimate_cost
from roofline.server.errors import install_error_handlers
from roofline.server.metrics import CONTENT_TYPE
from roofline.server.middleware import GuardMiddleware
from roofline.server.streaming import ClientGone, until_disconnected

_POSTED = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize", "/detokenize")
_EMBEDDINGS = "/v1/embeddings"
_GENERATION = ("/v1/completions", "/v1/chat/completions")


def _parse(raw: bytes) -> object:
    """The body as JSON, or None: a malformed body still goes to a replica, which answers the right 400."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def create_router_app(proxy: ReplicaProxy, supervisor: ReplicaSupervisor, ctx: RouterContext) -> FastAPI:
    """The OpenAI-compatible front end over running replicas (whose supervisor the caller starts and stops)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        monitor = asyncio.create_task(supervisor.monitor())
        try:
            yield
        finally:
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
            await proxy.client.aclose()
            await supervisor.aclose()

    app = FastAPI(title="roofline (data parallel)", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)  # /openapi.json is a replica's, forwarded below
    app.state.ctx = ctx
    install_error_handlers(app)

    async def forward(request: Request, path: str, body: bytes | None, cost: RequestCost,
                      is_stream: bool) -> Response:
        try:  # the body is read, so from here `receive` returns only when the client leaves
            return await until_disconnected(request.receive, proxy.forward(request.method, path, body, cost,
                                                                           is_stream))
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)

    async def posted(request: Request) -> Response:
        raw = await request.body()
        data = _parse(raw)
        if request.url.path == _EMBEDDINGS and isinstance(data, dict):  # its prompt tokens, nothing generated
            cost = estimate_cost({"prompt": data.get("input"), "max_tokens": 0}, proxy.router.policy)
        else:
            cost = estimate_cost(data, proxy.router.policy)
        if request.url.path not in (*_GENERATION, _EMBEDDINGS):  # tokenizing computes nothing: affinity only
            cost = RequestCost(cost.prefix_key, 0)
        is_stream = isinstance(data, dict) and data.get("stream") is True
        return await forward(request, request.url.path, raw, cost, is_stream)

    for path in _POSTED:
        app.add_api_route(path, posted, methods=["POST"], name=path.strip("/").replace("/", "_"))

    async def got(request: Request) -> Response:
        return await forward(request, request.url.path, None, RequestCost(None, 0), False)

    app.add_api_route("/v1/models", got, methods=["GET"], name="list_models")
    app.add_api_route("/v1/models/{model:path}", got, methods=["GET"], name="retrieve_model")
    app.add_api_route("/openapi.json", got, methods=["GET"], name="openapi")

    @app.get("/health")
    async def health() -> JSONResponse:
        replicas = {"healthy": supervisor.num_healthy, "total": len(supervisor.replicas)}
        if ctx.drain.is_draining:
            return JSONResponse({"status": "draining", "replicas": replicas}, status_code=503)
        if replicas["healthy"] == 0:
            return JSONResponse({"status": "no replica ready", "replicas": replicas}, status_code=503)
        return JSONResponse({"status": "ok", "replicas": replicas})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(await ctx.metrics.render(proxy.client), media_type=CONTENT_TYPE)

    # GuardMiddleware reads only ctx.config, ctx.drain and ctx.metrics.requests, which RouterContext carries
    app.add_middleware(GuardMiddleware, ctx=ctx, routes=tuple(app.routes))
    return app
