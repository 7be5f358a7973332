"""AsyncEngine: runs the LLMEngine step loop on its own thread and streams outputs to asyncio callers.

Callers `async for out in engine.generate(...)`; each `out` is a snapshot of the request so far.
Stopping the iteration early (client gone) aborts the request, and its KV blocks are freed before
the next step. Stop strings are held back from snapshots until they can no longer be cut.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Protocol

from roofline.engine.llm_engine import LLMEngine
from roofline.engine.stats import EngineStats
from roofline.errors import RooflineError
from roofline.outputs import CompletionOutput, RequestOutput
from roofline.sampling_params import SamplingParams

logger = logging.getLogger("roofline")


class QueueFullError(RooflineError):
    """The engine's waiting queue is full; retry later."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped on an internal error."""


class RequestCancelledError(RooflineError):
    """The server ended the request before it finished (the drain deadline passed)."""


def _snapshot(out: RequestOutput, params: SamplingParams) -> RequestOutput:
    hold = 0 if out.finished or not params.stop else max(len(s) for s in params.stop) - 1
    outputs = []
    for c in out.outputs:
        text = c.text if c.finished or hold == 0 else c.text[: max(len(c.text) - hold, 0)]
        outputs.append(CompletionOutput(c.index, text, list(c.token_ids),
                                        list(c.logprobs) if c.logprobs is not None else None,
                                        c.finish_reason, c.stop_reason))
    return replace(out, outputs=outputs)


class StepHook(Protocol):
    """Work the engine thread runs around its steps until done (the profiler of POST /debug/profile)."""

    is_done: bool

    def before_step(self) -> None: ...

    def after_step(self) -> None: ...

    def poll(self) -> None: ...  # called while the engine is idle

    def cancel(self, exc: BaseException) -> None: ...  # the engine stopped


class AsyncEngine:
    """Thread-backed asynchronous front of an LLMEngine."""

    def __init__(self, engine: LLMEngine, max_queue: int | None = None) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, SamplingParams]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._pending = 0  # requests in the inbox, not yet seen by the engine thread
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self._step_hooks: list[StepHook] = []  # added from any thread; run and dropped by the engine thread
        self._thread = threading.Thread(target=self._loop, name="roofline-engine", daemon=True)
        self._thread.start()

    @property
    def num_waiting(self) -> int:
        """Requests queued and not yet running."""
        return len(self.engine.scheduler.waiting) + self._pending

    @property
    def num_running(self) -> int:
        """Requests in the running batch."""
        return len(self.engine.scheduler.running)

    @property
    def num_active(self) -> int:
        """Requests not yet finished."""
        return len(self._streams)

    def stats(self) -> EngineStats:
        """The engine's snapshot (engine_stats), requests not yet seen by the engine thread counted as waiting."""
        return replace(self.engine.engine_stats(), num_waiting=self.num_waiting)

    def is_alive(self) -> bool:
        """True while the engine thread runs."""
        return self._thread.is_alive() and self.error is None

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                       priority: int = 0, tenant: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and iterate its snapshots; leaving early aborts it."""
        if self.error is not None:
            raise EngineDeadError(f"engine stopped: {self.error}")
        if self.max_queue is not None and self.num_waiting >= self.max_queue:
            raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting); retry later")
        if params.structured is not None:  # compiled here, off the engine thread (then cached for add_request)
            await asyncio.to_thread(self.engine.grammar.compile, params.structured)
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, stream, params)
        with self._lock:
            self._pending += 1
        self._inbox.put(("add", request_id, prompt, params, priority, tenant))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request; its blocks are freed before the next step."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def cancel_all(self, reason: str) -> int:
        """End every request in flight with RequestCancelledError(reason) and abort it; returns how many."""
        request_ids = list(self._streams)
        for rid in request_ids:
            self._deliver(rid, RequestCancelledError(reason))
            self.abort(rid)
        return len(request_ids)

    def add_step_hook(self, hook: StepHook) -> None:
        """Run `hook` on the engine thread around the coming steps (and while idle) until hook.is_done."""
        if not self.is_alive() or self._stopping:
            raise EngineDeadError(f"engine stopped: {self.error or 'shut down'}")
        with self._lock:
            self._step_hooks.append(hook)
        self._wake.set()

    def _live_hooks(self) -> list[StepHook]:
        with self._lock:
            self._step_hooks = [h for h in self._step_hooks if not h.is_done]
            return list(self._step_hooks)

    def _step(self) -> list[RequestOutput]:
        """One engine step, with the step hooks around it."""
        hooks = self._live_hooks()
        for hook in hooks:
            hook.before_step()
        try:
            return self.engine.step()
        finally:
            for hook in hooks:
                hook.after_step()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the engine thread (requests still running are aborted)."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def _deliver(self, request_id: str, item) -> None:
        entry = self._streams.get(request_id)
        if entry is None:
            return
        loop, stream, params = entry
        if isinstance(item, RequestOutput):
            item = _snapshot(item, params)
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed
            pass

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                _, rid, prompt, params, priority, tenant = msg
                with self._lock:
                    self._pending -= 1
                if rid not in self._streams:  # the caller left before we saw it
                    continue
                try:
                    self.engine.add_request(rid, prompt, params, priority, tenant)
                except Exception as exc:  # bad input is reported to its caller only
                    self._deliver(rid, exc)
            else:
                self.engine.abort(msg[1])

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    for hook in self._live_hooks():
                        hook.poll()
                    self._wake.wait(0.1)
                    self._wake.clear()
                    continue
                for out in self._step():
                    self._deliver(out.request_id, out)
            self.engine.abort(list(self.engine.groups))
            for hook in self._live_hooks():
                hook.cancel(EngineDeadError("engine stopped: shut down"))
        except BaseException as exc:  # an engine bug: fail every caller rather than hang them
            logger.exception("engine loop failed")
            self.error = exc
            for hook in self._live_hooks():
                hook.cancel(EngineDeadError(f"engine stopped: {exc}"))
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"engine stopped: {exc}"))
