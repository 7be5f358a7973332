"""bench/gpu.py --smoke: the GPU checks' logic, run on the CPU with tiny shapes.

The script runs once, as a subprocess (as a lent GPU would run it); the tests read its JSON. They check
that each check produced rows and that the rows are sane, never how fast anything was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    """One `bench/gpu.py --smoke --json` run: (the process, its JSON)."""
    out = tmp_path_factory.mktemp("gpu-bench") / "smoke.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    data = json.loads(out.read_text()) if out.exists() else {}
    return proc, data


def test_smoke_run_exits_cleanly_and_completes(smoke) -> None:
    proc, data = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert data["complete"] is True
    assert data["env"]["device"] == "cpu" and data["env"]["torch"]


def test_parity_rows_pass_in_both_dtypes(smoke) -> None:
    _, data = smoke
    rows = [r for r in data["rows"] if r["kind"] == "parity"]
    assert {r["dtype"] for r in rows} == {"bfloat16", "float32"}
    assert len({r["model"] for r in rows}) >= 3
    for r in rows:
        assert r["status"] == "PASS", r
        assert r["tokens_match"] and r["num_matching_tokens"] == r["steps"]
        assert r["max_abs_logprob_diff_matched_steps"] <= r["tolerance"]


def test_decode_rows_measure_throughput_and_a_roofline_fraction(smoke) -> None:
    _, data = smoke
    rows = [r for r in data["rows"] if r["kind"] == "decode"]
    assert {(r["model"], r["batch"]) for r in rows} == {(m, b) for m in ("llama-smoke", "llama-smoke-untied")
                                                        for b in (1, 4)}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["tok_s"] > 0 and r["step_ms"] > 0
        assert 0 < r["fraction_measured"] < 1.5
        assert r["kv_bytes_read"] > 0 and 0 < r["weight_bytes_read"] <= r["weight_bytes"]


def test_targets_are_reported_not_applicable_off_an_h200(smoke) -> None:
    proc, data = smoke
    targets = [r for r in data["rows"] if r["kind"] == "target"]
    assert len(targets) == 4 and all(r["status"].startswith("n/a") for r in targets)
    assert "| model | mode | batch |" in proc.stdout
