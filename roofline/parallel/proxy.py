"""The data-parallel front end: one OpenAI-compatible app that forwards each request to a replica.

A request goes to the replica the router picks. If that replica fails before answering (connection
refused or reset, the process gone, a 503 from a replica that is going away), the request is sent to
another one: nothing had reached the client yet. A stream is held back until the replica's first event
arrives, so a replica that dies before streaming anything is retried too; after that, events pass
through as they come, and a replica that stops mid-way ends the client's stream with an OpenAI error
event and `data: [DONE]`, never a silent truncation. No read waits forever on a dead replica: its
socket closes when the process dies, and the supervisor kills a replica that stops answering /health.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import httpx
from fastapi.responses import Response

from roofline.parallel.metrics import RouterMetrics
from roofline.parallel.replicas import ReplicaSupervisor
from roofline.parallel.router import RequestCost, Router
from roofline.server.config import ServerConfig
from roofline.server.context import DrainState
from roofline.server.errors import APIError
from roofline.server.streaming import EventStreamResponse

T = TypeVar("T")
logger = logging.getLogger("roofline.parallel")
CLIENT_CLOSED = 499
REPLICA_HEADER = "x-roofline-replica"  # which replica answered: for operators and tests
_PASSED_BACK = ("content-type", "retry-after", "allow")  # replica response headers the client sees
_DONE_EVENT = b"data: [DONE]"


@dataclass(frozen=True)
class ProxyConfig:
    """How hard the front end tries before it gives up on a request."""

    max_attempts: int = 3  # replicas tried for one request (the first try included)
    wait_for_replica_s: float = 30.0  # a request arriving while no replica is healthy waits this long, then 503
    connect_timeout_s: float = 5.0  # connecting to a replica (loopback: only a dead or hung one takes long)


@dataclass
class RouterContext:
    """What GuardMiddleware reads for the front end: settings (keys, body limit), request metrics, drain state."""

    config: ServerConfig
    metrics: RouterMetrics
    drain: DrainState = field(default_factory=DrainState)


class ReplicaFailed(Exception):
    """The replica could not answer (refused, reset, closed, or going away); another one may."""


class ReplicaProxy:
    """Forwards requests to replicas through the router, retrying failures that the client never saw."""

    def __init__(self, router: Router, supervisor: ReplicaSupervisor, metrics: RouterMetrics,
                 internal_api_key: str, config: ProxyConfig | None = None) -> None:
        self.router = router
        self.supervisor = supervisor
        self.metrics = metrics
        self.config = config or ProxyConfig()
        self._auth = f"Bearer {internal_api_key}"
        # no read timeout: a queued request may wait long for its first token; a dead replica closes the socket
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=self.config.connect_timeout_s),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self._cancels: set[asyncio.Event] = set()
        self._cancel_message = "the server is shutting down"

    def cancel_all(self, message: str) -> int:
        """End every request in flight with a 503 (streams: an error event and [DONE]); returns how many."""
        self._cancel_message = message
        for cancel in self._cancels:
            cancel.set()
        return len(self._cancels)

    async def _race(self, work: Awaitable[T], cancel: asyncio.Event) -> T:
        """`work`'s result, unless the request is cancelled (drain deadline) first."""
        task = asyncio.ensure_future(work)
        waiter = asyncio.ensure_future(cancel.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            raise APIError(503, self._cancel_message, code="server_shutting_down")
        return task.result()

    async def _acquire(self, cost: RequestCost, failed: set[int]) -> int:
        replica = self.router.acquire(cost, exclude=failed)
        if replica is None and not failed and await self.supervisor.wait_routable(self.config.wait_for_replica_s):
            replica = self.router.acquire(cost, exclude=failed)
        if replica is None:
            tried = f" ({len(failed)} tried failed)" if failed else ""
            raise APIError(503, f"no engine replica is ready to take the request{tried}; retry shortly",
                           code="replicas_unavailable", headers={"Retry-After": "1"})
        self.metrics.routed.labels(str(replica)).inc()
        return replica

    async def _open(self, replica: int, method: str, path: str, body: bytes | None) -> httpx.Response:
        """Send the request and wait for the status line; ReplicaFailed if the replica cannot take it."""
        url = self.supervisor.replicas[replica].url + path
        headers = {"Authorization": self._auth, "Content-Type": "application/json"}
        try:
            resp = await self.client.send(self.client.build_request(method, url, content=body, headers=headers),
                                          stream=True)
        except httpx.TransportError as exc:
            raise ReplicaFailed(f"{type(exc).__name__}: {exc}") from None
        if resp.status_code == 503:  # draining or its engine stopped: it never started on this request
            await resp.aclose()
            raise ReplicaFailed("answered 503")
        return resp

    def _headers(self, resp: httpx.Response, replica: int) -> dict[str, str]:
        headers = {k: resp.headers[k] for k in _PASSED_BACK if k in resp.headers}
        headers[REPLICA_HEADER] = str(replica)
        return headers

    async def forward(self, method: str, path: str, body: bytes | None, cost: RequestCost,
                      is_stream: bool) -> Response:
        """The replica's answer to the request, retried on other replicas while the client has seen nothing."""
        cancel = asyncio.Event()
        self._cancels.add(cancel)
        failed: set[int] = set()
        handed_off = False  # a stream that started: its close releases the load and the cancel event
        try:
            while len(failed) < self.config.max_attempts:
                replica = await self._acquire(cost, failed)
                resp: httpx.Response | None = None
                try:
                    resp = await self._race(self._open(replica, method, path, body), cancel)
                    if is_stream and resp.status_code == 200 and \
                            resp.headers.get("content-type", "").startswith("text/event-stream"):
                        chunks = resp.aiter_raw()
                        first = await self._race(_first_chunk(chunks), cancel)
                        handed_off = True
                        return self._stream(replica, resp, chunks, first, cost, cancel)
                    content = await self._race(resp.aread(), cancel)
                    return Response(content, status_code=resp.status_code, headers=self._headers(resp, replica))
                except (ReplicaFailed, httpx.TransportError) as exc:
                    failed.add(replica)
                    self.supervisor.report_failure(replica)
                    self.metrics.retries.labels(str(replica)).inc()
                    logger.warning("replica %d failed before answering %s (%s); trying another", replica, path, exc)
                finally:
                    if not handed_off:
                        self.router.release(replica, cost)
                        if resp is not None:
                            await resp.aclose()
            raise APIError(503, f"{len(failed)} replicas failed to answer this request; retry shortly",
                           code="replicas_unavailable", headers={"Retry-After": "1"})
        finally:
            if not handed_off:
                self._cancels.discard(cancel)

    def _stream(self, replica: int, resp: httpx.Response, chunks: AsyncIterator[bytes], first: bytes,
                cost: RequestCost, cancel: asyncio.Event) -> EventStreamResponse:
        is_closed = False

        async def close() -> None:
            nonlocal is_closed
            if not is_closed:
                is_closed = True
                self.router.release(replica, cost)
                self._cancels.discard(cancel)
                await resp.aclose()

        return EventStreamResponse(self._relay(replica, chunks, first, cancel), on_close=close,
                                   headers={REPLICA_HEADER: str(replica)})

    async def _relay(self, replica: int, chunks: AsyncIterator[bytes], first: bytes,
                     cancel: asyncio.Event) -> AsyncIterator[bytes]:
        """Pass whole events through; a replica that stops before [DONE] ends the stream with an error."""
        pending = first
        saw_done = False
        while True:
            cut = pending.rfind(b"\n\n")
            if cut >= 0:  # only whole events, so an error event never lands inside a cut one
                events, pending = pending[:cut + 2], pending[cut + 2:]
                saw_done = saw_done or _DONE_EVENT in events
                yield events
            try:
                pending += await self._race(anext(chunks), cancel)
            except StopAsyncIteration:
                break
            except httpx.TransportError:
                break
        if not saw_done:
            self.metrics.cut_streams.labels(str(replica)).inc()
            self.supervisor.report_failure(replica)
            logger.warning("replica %d stopped mid-stream; ending the client's stream with an error", replica)
            raise APIError(503, f"the engine replica serving this stream stopped mid-way (replica {replica}); "
                                f"the output so far is incomplete, retry the request", code="replica_failed")


async def _first_chunk(chunks: AsyncIterator[bytes]) -> bytes:
    """The first non-empty body chunk; ReplicaFailed if the body ends or breaks before one."""
    try:
        while not (chunk := await anext(chunks)):
            pass
    except StopAsyncIteration:
        raise ReplicaFailed("stream ended before its first event") from None
    except httpx.TransportError as exc:
        raise ReplicaFailed(f"stream broke before its first event: {type(exc).__name__}") from None
    return chunk
