"""GuardMiddleware: request metrics for every route; for /v1 routes, drain (503), auth (401) and body size (413).

A plain ASGI middleware (not BaseHTTPMiddleware) so streaming responses and disconnects pass through
untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from roofline.server.auth import is_authorized
from roofline.server.context import ServingContext
from roofline.server.errors import APIError, BodyTooLarge, error_body, too_large

API_PREFIX = "/v1/"
GUARDED_PATHS = ("/tokenize", "/detokenize",  # outside /v1 (vLLM's paths) but API work: keyed and drained alike
                 "/debug/profile")  # (serve --enable-profiling) keyed too: it slows the engine while it records
UNKNOWN_ROUTE = "other"  # the metrics label of a path no route serves


def route_label(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The template of the route serving `scope` ("/v1/models/{model}"), else UNKNOWN_ROUTE.

    Never the raw path: one label per path a client can make up would grow the metrics without bound.
    A path served under another method (a 405) still gets its route's template.
    """
    for route in routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return getattr(route, "path_format", UNKNOWN_ROUTE)
    return UNKNOWN_ROUTE


class GuardMiddleware:
    """Counts requests by route and status; guards /v1 routes and tracks how many are in flight."""

    def __init__(self, app: ASGIApp, ctx: ServingContext, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.ctx = ctx
        self.routes = routes  # the app's routes, whose templates label the request counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        route = route_label(self.routes, scope)
        status = 500  # what is counted if the app fails before it answers

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if not path.startswith(API_PREFIX) and path not in GUARDED_PATHS:
                await self.app(scope, receive, send_counted)
                return
            refusal = self._refusal(scope)
            if refusal is not None:
                await _send_error(refusal, send_counted)
                return
            drain = self.ctx.drain
            drain.num_in_flight += 1
            try:
                await self.app(scope, self._limited(receive), send_counted)
            finally:
                drain.num_in_flight -= 1
        finally:
            self.ctx.metrics.requests.labels(route=route, status=str(status)).inc()

    def _refusal(self, scope: Scope) -> APIError | None:
        config = self.ctx.config
        if self.ctx.drain.is_draining:
            return APIError(503, "the server is shutting down; retry on another replica or later", code="draining",
                            headers={"Retry-After": str(config.retry_after_s), "Connection": "close"})
        headers = dict(scope["headers"])
        if not is_authorized(headers.get(b"authorization"), config.api_keys):
            return APIError(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None:
            try:
                num_bytes = int(length)
            except ValueError:
                return APIError(400, "the Content-Length header is not a number", code="invalid_header")
            if num_bytes > config.max_body_bytes:
                return too_large(config.max_body_bytes)
        return None

    def _limited(self, receive: Receive) -> Receive:
        """`receive` that raises BodyTooLarge once the body read so far passes the limit (chunked uploads)."""
        limit = self.ctx.config.max_body_bytes
        num_read = 0

        async def receive_limited() -> Message:
            nonlocal num_read
            message = await receive()
            if message["type"] == "http.request":
                num_read += len(message.get("body", b""))
                if num_read > limit:
                    raise BodyTooLarge(limit)
            return message

        return receive_limited


async def _send_error(err: APIError, send: Send) -> None:
    body = error_body(err)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
