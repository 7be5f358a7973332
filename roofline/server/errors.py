"""The handlers that turn every failure into OpenAI's error JSON with the right status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from roofline.openai.errors import APIError
from roofline.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger("roofline.server")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_exceeded",
          500: "server_error", 503: "service_unavailable"}


class BodyTooLarge(Exception):
    """Raised while reading a request body past the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"limit {limit}")
        self.limit = limit


def too_large(limit: int) -> APIError:
    """The 413 for a body over `limit` bytes."""
    return APIError(413, f"the request body is larger than the limit of {limit} bytes; send a smaller request",
                    code="request_too_large")


def error_body(err: APIError) -> bytes:
    """The JSON bytes of an error."""
    info = ErrorInfo(message=err.message, type=_TYPES.get(err.status, "invalid_request_error"),
                     param=err.param, code=err.code)
    return ErrorResponse(error=info).model_dump_json().encode()


def error_response(err: APIError) -> JSONResponse:
    """A JSONResponse for an APIError."""
    resp = JSONResponse(content=None, status_code=err.status, headers=err.headers)
    resp.body = error_body(err)
    resp.headers["content-length"] = str(len(resp.body))
    return resp


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception to an OpenAI error JSON; nothing escapes as a bare 500."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(BodyTooLarge)
    async def _body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return error_response(too_large(exc.limit))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see GET /v1/models, POST /v1/completions, " \
                      f"POST /v1/chat/completions, POST /v1/embeddings, POST /tokenize, POST /detokenize"
            return error_response(APIError(404, message, code="not_found"))
        if exc.status_code == 405:  # Starlette's Allow header (RFC 9110 requires it) is kept
            return error_response(APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                                           code="method_not_allowed", headers=dict(exc.headers or {})))
        return error_response(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal error ({type(exc).__name__}); this is a roofline bug, "
                                            f"please report it"))
