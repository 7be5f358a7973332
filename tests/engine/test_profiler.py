"""StepProfiler: records exactly the steps asked for, stops at its deadline, and fails cleanly when cancelled."""

from __future__ import annotations

import json

import pytest
import torch

from roofline.engine.profiler import MAX_PROFILE_STEPS, StepProfiler
from roofline.errors import RooflineError


def _fake_step() -> None:
    x = torch.ones(8, 8)
    (x @ x).sum()


def test_records_n_steps_then_stops(tmp_path):
    profiler = StepProfiler(2, timeout_s=60)
    for _ in range(4):  # the engine keeps calling; only the first two steps are recorded
        if not profiler.is_done:
            profiler.before_step()
        _fake_step()
        if not profiler.is_done:
            profiler.after_step()
    assert profiler.is_done
    result = profiler.future.result()
    assert result.num_steps == 2
    path = tmp_path / "t.json"
    result.prof.export_chrome_trace(str(path))
    names = {e.get("name") for e in json.loads(path.read_text())["traceEvents"]}
    assert {"roofline.step#0", "roofline.step#1"} <= names and "roofline.step#2" not in names
    assert "aten::mm" in names


def test_deadline_ends_it_with_the_steps_so_far():
    profiler = StepProfiler(5, timeout_s=0)
    profiler.poll()  # idle engine, deadline passed: done with nothing recorded
    result = profiler.future.result()
    assert result.num_steps == 0 and result.prof is None

    profiler = StepProfiler(5, timeout_s=60)
    profiler.before_step()
    _fake_step()
    profiler.after_step()
    profiler.deadline = 0.0  # as if time ran out after one step
    profiler.poll()
    assert profiler.future.result().num_steps == 1


def test_cancel_fails_the_result():
    profiler = StepProfiler(3, timeout_s=60)
    profiler.before_step()
    profiler.cancel(RuntimeError("engine stopped"))
    assert profiler.is_done
    with pytest.raises(RuntimeError, match="engine stopped"):
        profiler.future.result()
    profiler.after_step()  # the engine may still close the step: harmless


@pytest.mark.parametrize("steps", [0, -1, MAX_PROFILE_STEPS + 1])
def test_step_counts_out_of_range_are_refused(steps):
    with pytest.raises(RooflineError, match="steps must be in"):
        StepProfiler(steps, timeout_s=1)
