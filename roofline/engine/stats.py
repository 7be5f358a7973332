"""Engine state for dashboards: cumulative step counters and a typed snapshot of the engine now.

Counters only ever grow, so a reader samples them twice and divides the differences by the time
between: rates and per-step means over any interval, without the engine keeping history.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepCounters:
    """Totals over every engine step since start-up; seconds measured around each stage of the step."""

    num_steps: int = 0
    num_scheduled_seqs: int = 0  # sequences summed over steps: / num_steps is the mean batch per step
    num_batched_tokens: int = 0  # prompt-chunk and decode tokens computed
    schedule_s: float = 0.0  # Scheduler.schedule
    execute_s: float = 0.0  # ModelRunner.execute: the forward pass and sampling
    output_s: float = 0.0  # the scheduler's update and the output processor (detokenize, stops, logprobs)
    last_batch_size: int = 0  # sequences in the latest step

    def record(self, num_seqs: int, num_tokens: int, schedule_s: float, execute_s: float, output_s: float) -> None:
        """Add one step."""
        self.num_steps += 1
        self.num_scheduled_seqs += num_seqs
        self.num_batched_tokens += num_tokens
        self.schedule_s += schedule_s
        self.execute_s += execute_s
        self.output_s += output_s
        self.last_batch_size = num_seqs


@dataclass(frozen=True)
class EngineStats:
    """The engine at one moment: queue and batch, KV cache, token totals and step counters."""

    num_running: int  # sequences in the running batch
    num_waiting: int  # requests queued, not yet running
    num_kv_blocks_used: int
    num_kv_blocks_total: int
    prefix_cache_queried_tokens: int  # prompt tokens looked up in the prefix cache since start
    prefix_cache_hit_tokens: int  # of those, found there
    num_preemptions: int
    num_prompt_tokens: int  # prompt tokens admitted since start
    num_generated_tokens: int  # tokens generated since start
    num_context_tokens: int  # prompt + output tokens of the running sequences (what a decode step attends)
    steps: StepCounters  # a copy, so later steps do not change it

    @property
    def kv_cache_usage(self) -> float:
        """Share of KV blocks in use (0 to 1)."""
        return self.num_kv_blocks_used / self.num_kv_blocks_total if self.num_kv_blocks_total else 0.0
