"""The dashboard's data: engine samples once a second in a ring buffer, each set against the planner's roofline.

A sample differences two EngineStats snapshots, so its rates (tok/s, steps, mean batch, step-time split,
prefix-cache hit rate) are over the interval between them, not since start-up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

from roofline.engine.async_engine import AsyncEngine
from roofline.engine.stats import EngineStats
from roofline.server.roofline_ref import RooflineReference, build_reference

logger = logging.getLogger("roofline.server")

SAMPLE_INTERVAL_S = 1.0
NUM_SAMPLES = 300  # five minutes at one a second


@dataclass(frozen=True)
class StepSplit:
    """Mean milliseconds per engine step in each stage the engine times, over one interval."""

    schedule_ms: float  # the scheduler's plan
    execute_ms: float  # the model runner: forward pass and sampling
    output_ms: float  # scheduler update and output processing (detokenize, stops, logprobs)


@dataclass(frozen=True)
class DashboardSample:
    """The engine over one sampling interval, ending at `time`."""

    time: float  # Unix seconds at the end of the interval
    num_running: int  # sequences in the running batch at `time`
    num_waiting: int  # requests queued at `time`
    num_steps: int  # engine steps in the interval
    batch_size: float  # mean sequences per step in the interval (0 when no step ran)
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_hit_rate: float | None  # share of prompt tokens looked up in the interval found cached; None: none
    prompt_tok_s: float  # prompt tokens admitted per second
    generation_tok_s: float  # tokens generated per second
    step: StepSplit | None  # None when no step ran
    context_tokens: float  # mean tokens per running sequence (what each decode step attends)
    roofline_tok_s: float | None  # the planner's decode tok/s at this batch and context on this hardware
    roofline_fraction: float | None  # generation_tok_s / roofline_tok_s


def _delta_rate(new: float, old: float, seconds: float) -> float:
    return max(new - old, 0) / seconds if seconds > 0 else 0.0


class DashboardSampler:
    """Samples the engine every `interval_s` into a ring of the last `num_samples`."""

    def __init__(self, engine: AsyncEngine, interval_s: float = SAMPLE_INTERVAL_S, num_samples: int = NUM_SAMPLES,
                 clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.samples: deque[DashboardSample] = deque(maxlen=num_samples)
        self.reference: RooflineReference | None = None  # set once run() has built it (off the event loop)
        self.reference_error: str | None = None  # why there is no roofline, when building it failed
        self.clock = clock
        self._last: tuple[float, EngineStats] | None = None
        self._context_tokens = 0.0  # the latest mean context seen, kept while the batch is empty

    async def run(self) -> None:
        """Forever: build the roofline reference once, then take a sample every interval."""
        try:
            self.reference = await asyncio.to_thread(build_reference, self.engine.engine)
        except Exception as exc:  # the dashboard still shows the engine without a roofline
            logger.warning("dashboard: no roofline reference (%s)", exc)
            self.reference_error = str(exc)
        while True:
            try:
                self.observe(self.engine.stats(), self.clock())
            except Exception:  # a bad sample must not end the sampling: say so, and try again next interval
                logger.exception("dashboard: sampling the engine failed")
            await asyncio.sleep(self.interval_s)

    def observe(self, stats: EngineStats, now: float) -> DashboardSample | None:
        """Add the sample from the previous snapshot to `stats` (None for the first snapshot)."""
        last, self._last = self._last, (now, stats)
        if last is None:
            return None
        then, old = last
        seconds = now - then
        steps, old_steps = stats.steps, old.steps
        num_steps = max(steps.num_steps - old_steps.num_steps, 0)
        batch = (steps.num_scheduled_seqs - old_steps.num_scheduled_seqs) / num_steps if num_steps else 0.0
        split = None
        if num_steps:
            split = StepSplit(schedule_ms=1e3 * (steps.schedule_s - old_steps.schedule_s) / num_steps,
                              execute_ms=1e3 * (steps.execute_s - old_steps.execute_s) / num_steps,
                              output_ms=1e3 * (steps.output_s - old_steps.output_s) / num_steps)
        queried = stats.prefix_cache_queried_tokens - old.prefix_cache_queried_tokens
        hits = stats.prefix_cache_hit_tokens - old.prefix_cache_hit_tokens
        if stats.num_running:
            self._context_tokens = stats.num_context_tokens / stats.num_running
        generation_tok_s = _delta_rate(stats.num_generated_tokens, old.num_generated_tokens, seconds)
        roofline_tok_s = None
        if self.reference is not None and batch > 0:
            roofline_tok_s = self.reference.decode_tok_s(max(round(batch), 1), max(self._context_tokens, 1.0))
        sample = DashboardSample(
            time=now, num_running=stats.num_running, num_waiting=stats.num_waiting, num_steps=num_steps,
            batch_size=batch, kv_blocks_used=stats.num_kv_blocks_used, kv_blocks_total=stats.num_kv_blocks_total,
            prefix_cache_hit_rate=hits / queried if queried > 0 else None,
            prompt_tok_s=_delta_rate(stats.num_prompt_tokens, old.num_prompt_tokens, seconds),
            generation_tok_s=generation_tok_s, step=split, context_tokens=self._context_tokens,
            roofline_tok_s=roofline_tok_s,
            roofline_fraction=generation_tok_s / roofline_tok_s if roofline_tok_s else None)
        self.samples.append(sample)
        return sample

    def report(self, model: str, since: float | None = None) -> dict:
        """The JSON body of GET /dashboard/stats: the roofline's basis, the latest sample and the ring."""
        samples = [s for s in self.samples if since is None or s.time > since]
        reference = self.reference.describe() if self.reference is not None else None
        stats = self.engine.stats()
        return {
            "model": model,
            "interval_s": self.interval_s,
            "capacity": self.samples.maxlen,
            "roofline": reference,
            "roofline_error": self.reference_error,
            "totals": {"prompt_tokens": stats.num_prompt_tokens, "generated_tokens": stats.num_generated_tokens,
                       "steps": stats.steps.num_steps, "preemptions": stats.num_preemptions,
                       "num_running": stats.num_running, "num_waiting": stats.num_waiting},
            "latest": asdict(self.samples[-1]) if self.samples else None,
            "samples": [asdict(s) for s in samples],
        }
