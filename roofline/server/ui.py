"""The browser pages: the playground at GET /, the engine dashboard at GET /dashboard and its GET /dashboard/stats.

The pages are static files shipped in the package (roofline/server/static/), read once at start-up;
nothing is fetched from elsewhere at run time, and the Content-Security-Policy says so to the browser.
The pages call the same keyed API as any client; /dashboard/stats takes the API key like /v1.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from roofline.server.auth import is_authorized
from roofline.server.context import ServingContext
from roofline.server.dashboard import DashboardSampler
from roofline.server.errors import APIError

STATIC_DIR = Path(__file__).parent / "static"
STATIC_PREFIX = "/static/"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# same-origin only: no CDN, no inline script; the pages talk only to this server
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"}


def load_static(directory: Path = STATIC_DIR) -> dict[str, tuple[bytes, str]]:
    """Every servable file of `directory` by name: (bytes, media type). Only these names are ever served."""
    return {p.name: (p.read_bytes(), MEDIA_TYPES[p.suffix]) for p in sorted(directory.iterdir())
            if p.is_file() and p.suffix in MEDIA_TYPES}


def _since(request: Request) -> float | None:
    text = request.query_params.get("since")
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise APIError(400, f"since must be a number of Unix seconds, got {text!r}", code="invalid_value",
                       param="since") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise APIError(400, "since must be a finite number of Unix seconds", code="invalid_value", param="since")
    return value


def install_ui(app: FastAPI, ctx: ServingContext, sampler: DashboardSampler) -> None:
    """Add the page, static-file and stats routes to `app` (none of them in the OpenAPI schema)."""
    files = load_static()

    def serve(name: str) -> Response:
        entry = files.get(name)
        if entry is None:
            raise APIError(404, f"no static file {name!r}", code="not_found")
        body, media_type = entry
        return Response(body, media_type=media_type, headers=PAGE_HEADERS)

    @app.get("/", include_in_schema=False)
    async def playground_page() -> Response:
        return serve("playground.html")

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard_page() -> Response:
        return serve("dashboard.html")

    @app.get(STATIC_PREFIX + "{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        return serve(name)

    @app.get("/dashboard/stats", include_in_schema=False)
    async def dashboard_stats(request: Request) -> JSONResponse:
        authorization = request.headers.get("authorization")
        if not is_authorized(authorization.encode("latin-1") if authorization else None, ctx.config.api_keys):
            raise APIError(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return JSONResponse(sampler.report(ctx.config.model_name, _since(request)),
                            headers={"Cache-Control": "no-store"})
