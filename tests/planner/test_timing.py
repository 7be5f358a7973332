"""Calibration timing helpers: best of repeats, and a fixed plus per-unit cost from two points."""

import pytest

from roofline.planner.timing import best_time, fit_line


def test_fit_line_recovers_fixed_and_per_unit_cost():
    assert fit_line(1, 3.0, 11, 13.0) == pytest.approx((2.0, 1.0))
    assert fit_line(1, 3.0, 11, 1.0) == (3.0, 0.0)  # a noisy drop is no negative cost


def test_best_time_warms_up_and_keeps_the_fastest_run():
    calls = []
    assert best_time(lambda: calls.append(1), lambda: None, repeats=3, budget_s=10.0) >= 0
    assert len(calls) == 2 + 3  # two warm-ups, then the timed repeats
