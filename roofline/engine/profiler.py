"""torch profiler traces (Chrome trace JSON): of a whole generation, or of the next N steps of a serving engine.

StepProfiler is a step hook of AsyncEngine: the engine thread starts the profiler before the first step it
records and stops it after the last, so every op of those steps is on the thread that runs them. The
(slow) export to JSON is left to the caller, off the engine thread.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from roofline.errors import RooflineError

MAX_PROFILE_STEPS = 100  # a step of a 135M model is ~6,000 ops; more steps make traces too large to open


def profiler_activities() -> list[ProfilerActivity]:
    """What to record: CPU ops, and CUDA kernels when a GPU is there."""
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    return activities


def check_trace_path(path: str) -> str:
    """The absolute path of a trace file to write; a missing or unwritable folder is a one-line RooflineError."""
    full = os.path.abspath(os.path.expanduser(path))
    folder = os.path.dirname(full)
    if os.path.isdir(full):
        raise RooflineError(f"--profile {path}: is a folder; give a file name such as trace.json")
    if not os.path.isdir(folder):
        raise RooflineError(f"--profile {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise RooflineError(f"--profile {path}: cannot write in {folder}")
    return full


@contextlib.contextmanager
def chrome_trace(path: str | None, label: str = "roofline.generate") -> Iterator[None]:
    """Profile the block and write its Chrome trace JSON to `path` (from check_trace_path); None: no profiling."""
    if path is None:
        yield
        return
    with profile(activities=profiler_activities()) as prof:
        with record_function(label):
            yield
    try:
        prof.export_chrome_trace(path)
    except OSError as exc:
        raise RooflineError(f"cannot write the profiler trace to {path}: {exc.strerror or exc}") from None


@dataclass
class StepProfile:
    """What a StepProfiler recorded."""

    num_steps: int  # steps recorded: fewer than asked when the deadline passed first
    prof: profile | None  # the stopped profiler; None when no step ran


class StepProfiler:
    """Records the next `num_steps` engine steps, or those that ran before `timeout_s` passed.

    The engine thread calls before_step/after_step around each step and poll() while idle; `future`
    resolves with a StepProfile once done.
    """

    def __init__(self, num_steps: int, timeout_s: float) -> None:
        if not 1 <= num_steps <= MAX_PROFILE_STEPS:
            raise RooflineError(f"steps must be in [1, {MAX_PROFILE_STEPS}], got {num_steps}")
        self.num_steps = num_steps
        self.deadline = time.monotonic() + timeout_s
        self.future: concurrent.futures.Future[StepProfile] = concurrent.futures.Future()
        self._prof: profile | None = None
        self._step_range: record_function | None = None
        self._num_recorded = 0

    @property
    def is_done(self) -> bool:
        """True once the result (or an error) is set; the engine then drops the hook."""
        return self.future.done()

    def before_step(self) -> None:
        """Start the profiler on the first step; mark each step as a range in the trace."""
        if self.is_done:
            return
        try:
            if self._prof is None:
                self._prof = profile(activities=profiler_activities())
                self._prof.start()
            self._step_range = record_function(f"roofline.step#{self._num_recorded}")
            self._step_range.__enter__()
        except Exception as exc:  # a profiler that cannot start fails its request, never the engine
            self.cancel(exc)

    def after_step(self) -> None:
        """Close the step's range; stop once enough steps ran or the deadline passed."""
        if self.is_done:
            return
        if self._step_range is not None:
            self._step_range.__exit__(None, None, None)
            self._step_range = None
            self._num_recorded += 1
        if self._num_recorded >= self.num_steps or time.monotonic() >= self.deadline:
            self._finish()

    def poll(self) -> None:
        """While the engine is idle: stop with what was recorded once the deadline passed."""
        if time.monotonic() >= self.deadline:
            self._finish()

    def cancel(self, exc: BaseException) -> None:
        """Stop recording and fail the result (the engine stopped)."""
        self._step_range = None
        if self._prof is not None:
            prof, self._prof = self._prof, None
            try:
                prof.stop()
            except Exception:  # already failing: the first error is the one to report
                pass
        if not self.future.done():
            self.future.set_exception(exc)

    def _finish(self) -> None:
        prof, self._prof = self._prof, None
        try:
            if prof is not None:
                prof.stop()
        except Exception as exc:
            self.cancel(exc)
            return
        if not self.future.done():
            self.future.set_result(StepProfile(self._num_recorded, prof if self._num_recorded else None))
