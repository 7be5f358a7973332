"""Client-disconnect handling: race work against `http.disconnect`, and an SSE response that stops at once.

Starlette watches for disconnects only under some ASGI spec versions; doing it here keeps the
guarantee (a client that leaves stops its generation) whatever server runs the app.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from roofline.server.errors import APIError, error_body

T = TypeVar("T")
SSE_DONE = b"data: [DONE]\n\n"
logger = logging.getLogger("roofline.server")


class ClientGone(Exception):
    """The client disconnected before the work finished."""


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it and raising ClientGone if the client disconnects first.

    Call only after the request body was read: from then on `receive` returns only at a disconnect.
    """
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this coroutine itself is cancelled (server shutdown)
        if not work_task.done():
            work_task.cancel()
        watch_task.cancel()
        await asyncio.gather(work_task, watch_task, return_exceptions=True)
    if work_task.cancelled():
        raise ClientGone()
    return work_task.result()


def sse_event(payload: str) -> bytes:
    """One server-sent event carrying a JSON payload."""
    return f"data: {payload}\n\n".encode()


class EventStreamResponse(Response):
    """A text/event-stream response that stops and closes its source when the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.events = events
        self.on_close = on_close  # runs even if the events never started
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            err = None
            try:
                async for chunk in self.events:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except APIError as exc:  # cut mid-way (the drain deadline, the engine gone): say so, then end
                err = exc
            except (ClientGone, OSError, asyncio.CancelledError):
                raise
            except Exception:  # a bug: logged once, and the client still gets an error event and an end
                logger.exception("stream failed")
                err = APIError(500, "the server failed while streaming this response", code="internal_error")
            if err is not None:
                await send({"type": "http.response.body", "body": sse_event(error_body(err).decode()) + SSE_DONE,
                            "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await until_disconnected(receive, stream())
        except (ClientGone, OSError):
            pass
        finally:
            await self.events.aclose()  # type: ignore[attr-defined]
            if self.on_close is not None:
                await self.on_close()
