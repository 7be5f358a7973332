"""GenerationStream: the engine streams of one HTTP request (one per prompt), merged and timed.

Each prompt runs as its own engine request in a task that forwards snapshots to one queue, so a
request with several prompts streams them interleaved as the engine produces them. Closing the
stream (the client left, or an error) cancels those tasks, which aborts their engine requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing

from roofline.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestCancelledError
from roofline.errors import ContextOverflowError, InvalidRequestError, SLOUnattainableError
from roofline.outputs import RequestOutput
from roofline.sampling_params import SamplingParams
from roofline.server.errors import APIError
from roofline.server.metrics import ServerMetrics
from roofline.server.slo import NO_CLASS, Job
from roofline.server.tracing import current_trace

Prompt = str | list[int]
logger = logging.getLogger("roofline")


def engine_error(exc: BaseException, retry_after_s: int, param: str = "prompt") -> APIError | None:
    """The APIError for an error the engine raised, or None when it is not one a client caused."""
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), code="queue_full", headers={"Retry-After": str(retry_after_s)})
    if isinstance(exc, SLOUnattainableError):  # before InvalidRequestError, its base
        return APIError(429, str(exc), code="slo_unattainable", headers={"Retry-After": str(retry_after_s)})
    if isinstance(exc, ContextOverflowError):
        return APIError(400, str(exc), code="context_length_exceeded", param=param)
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), code="invalid_value")
    if isinstance(exc, RequestCancelledError):
        return APIError(503, str(exc), code="server_shutting_down")
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"{exc}; the server must be restarted", code="engine_dead")
    return None


class _Timing:
    """Per-prompt timestamps for the latency histograms."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.last: float | None = None  # time of the latest snapshot
        self.first: float | None = None  # time of the first generated token
        self.num_tokens = 0


class GenerationStream:
    """Merged, timed snapshots of one HTTP request's prompts; use as an async context manager."""

    def __init__(self, engine: AsyncEngine, prompts: list[Prompt], params: SamplingParams, request_id: str,
                 priority: int, metrics: ServerMetrics, retry_after_s: int, param: str = "prompt") -> None:
        self.engine = engine
        self.prompts = prompts
        self.params = params
        self.request_id = request_id
        self.priority = priority
        self.metrics = metrics
        self.retry_after_s = retry_after_s
        self.param = param  # the request field an input error points at
        self.latest: list[RequestOutput | None] = [None] * len(prompts)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._buffer: deque[tuple[int, RequestOutput]] = deque()
        self._tasks: list[asyncio.Task] = []
        self._timings: list[_Timing] = []
        self._num_finished = 0
        self.tenant: str | None = None  # who sent it, for fair shares (assign)
        self.class_name = NO_CLASS  # the latency class, for the per-class metrics
        self.trace = current_trace()  # the request's span (serve --otlp-traces-endpoint), else None
        if self.trace is not None:
            self.trace.add_stream(self)

    def assign(self, job: Job) -> None:
        """Run as `job` says: its priority, latency targets and tenant (call before starting)."""
        self.priority, self.tenant, self.class_name = job.priority, job.tenant, job.class_name
        self.params.slo = job.slo

    async def __aenter__(self) -> GenerationStream:
        now = time.monotonic()
        self._timings = [_Timing(now) for _ in self.prompts]
        self._tasks = [asyncio.create_task(self._produce(i, p)) for i, p in enumerate(self.prompts)]
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel what still runs; each cancelled engine request is aborted and frees its KV blocks."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _produce(self, i: int, prompt: Prompt) -> None:
        gen = self.engine.generate(prompt, self.params, f"{self.request_id}-{i}", priority=self.priority,
                                   tenant=self.tenant)
        try:
            async with aclosing(gen):
                async for out in gen:
                    self._queue.put_nowait((i, out))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._queue.put_nowait((i, exc))

    async def _next(self) -> tuple[int, RequestOutput]:
        i, item = await self._queue.get()
        if isinstance(item, BaseException):
            err = engine_error(item, self.retry_after_s, self.param)
            if isinstance(item, SLOUnattainableError):
                self.metrics.slo_requests.labels(self.class_name, "rejected").inc()
                logger.info("rejected %s (class %s): %s", self.request_id, self.class_name, item)
            if self.trace is not None:
                self.trace.record_error(err if err is not None else item)
            raise err if err is not None else item
        self._observe(i, item)
        self.latest[i] = item
        if item.finished:
            self._num_finished += 1
        return i, item

    def _observe(self, i: int, out: RequestOutput) -> None:
        now = time.monotonic()
        t = self._timings[i]
        num_tokens = sum(len(c.token_ids) for c in out.outputs)
        if t.last is None:
            self.metrics.time_to_first_token.observe(now - t.start)
            if out.queue_time is not None:
                self.metrics.queue_time.observe(out.queue_time)
        elif num_tokens > t.num_tokens:
            self.metrics.inter_token_latency.observe(now - t.last)
        t.last, t.num_tokens = now, num_tokens
        if t.first is None and num_tokens:
            t.first = now
        if out.finished:
            self.metrics.e2e_latency.observe(now - t.start)
            longest = max((len(c.token_ids) for c in out.outputs), default=0)
            self.metrics.observe_slo(self.class_name, self.params.slo, t.start, t.first, now, longest)

    async def wait_started(self) -> None:
        """Wait until every prompt has its first snapshot, so input errors surface before a response starts."""
        seen = {i for i, _ in self._buffer}
        while len(seen) < len(self.prompts):
            i, out = await self._next()
            self._buffer.append((i, out))
            seen.add(i)

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, snapshot) pairs until every prompt has finished."""
        while self._buffer:
            yield self._buffer.popleft()
        while self._num_finished < len(self.prompts):
            yield await self._next()

    async def final(self) -> list[RequestOutput]:
        """The finished output of every prompt, in prompt order."""
        async for _ in self.events():
            pass
        return [out for out in self.latest if out is not None]
