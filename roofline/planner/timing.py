"""Timing helpers of `roofline calibrate`: the best of repeated runs, and a line through two points."""

from __future__ import annotations

import time
from typing import Callable


def best_time(fn: Callable[[], object], sync: Callable[[], None], repeats: int, budget_s: float) -> float:
    """Best wall time of fn over up to `repeats` runs after two warm-ups, stopping after budget_s."""
    for _ in range(2):  # the first runs fault in fresh pages for the outputs
        fn()
    sync()
    best, started = float("inf"), time.perf_counter()
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - begin)
        if time.perf_counter() - started > budget_s:
            break
    return best


def fit_line(x0: float, t0: float, x1: float, t1: float) -> tuple[float, float]:
    """(fixed, per unit) of the line through (x0, t0) and (x1, t1), both clamped at zero."""
    per_unit = max(0.0, (t1 - t0) / (x1 - x0))
    return max(0.0, t0 - per_unit * x0), per_unit
