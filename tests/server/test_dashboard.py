"""The dashboard's data (samples from engine stats, the planner's roofline) and the UI routes over HTTP."""

from __future__ import annotations

import dataclasses
import time
from types import SimpleNamespace

import httpx
import pytest
import torch

from roofline.engine.stats import EngineStats, StepCounters
from roofline.planner import hardware_presets, model_presets, predict_rates
from roofline.planner.formats import get_weight_format
from roofline.planner.profile import CalibrationProfile, save_profile
from roofline.server.dashboard import DashboardSampler
from roofline.server.roofline_ref import (CALIBRATION, PRESET, HardwareChoice, RooflineReference, gpu_preset_name,
                                          local_hardware)


def _stats(steps: StepCounters, **fields) -> EngineStats:
    base = dict(num_running=0, num_waiting=0, num_kv_blocks_used=0, num_kv_blocks_total=100,
                prefix_cache_queried_tokens=0, prefix_cache_hit_tokens=0, num_preemptions=0, num_prompt_tokens=0,
                num_generated_tokens=0, num_context_tokens=0)
    return EngineStats(**{**base, **fields}, steps=dataclasses.replace(steps))


class _FixedRoofline:
    """A reference that allows 100 tok/s per sequence in the batch."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, float]] = []

    def decode_tok_s(self, batch: int, context: float) -> float:
        self.calls.append((batch, context))
        return 100.0 * batch


def test_a_sample_is_the_difference_of_two_snapshots():
    sampler = DashboardSampler(SimpleNamespace(), interval_s=1.0, num_samples=3)
    sampler.reference = _FixedRoofline()
    steps = StepCounters()
    assert sampler.observe(_stats(steps, num_generated_tokens=50, num_prompt_tokens=10,
                                  prefix_cache_queried_tokens=64, prefix_cache_hit_tokens=64), 100.0) is None
    for _ in range(10):  # ten steps of 4 sequences in the next two seconds
        steps.record(4, 4, schedule_s=0.001, execute_s=0.010, output_s=0.002)
    sample = sampler.observe(_stats(steps, num_running=4, num_waiting=2, num_kv_blocks_used=20,
                                    num_generated_tokens=90, num_prompt_tokens=110, num_context_tokens=4 * 130,
                                    prefix_cache_queried_tokens=164, prefix_cache_hit_tokens=89), 102.0)
    assert sample.num_steps == 10 and sample.batch_size == 4.0
    assert sample.generation_tok_s == 20.0 and sample.prompt_tok_s == 50.0
    assert sample.prefix_cache_hit_rate == pytest.approx(0.25)  # 25 of the interval's 100 looked-up tokens
    assert sample.step.execute_ms == pytest.approx(10.0) and sample.step.schedule_ms == pytest.approx(1.0)
    assert sample.step.output_ms == pytest.approx(2.0)
    assert sample.context_tokens == 130.0 and sampler.reference.calls == [(4, 130.0)]
    assert sample.roofline_tok_s == 400.0 and sample.roofline_fraction == pytest.approx(0.05)
    assert (sample.num_running, sample.num_waiting, sample.kv_blocks_used) == (4, 2, 20)


def test_an_idle_interval_has_no_step_split_and_no_roofline():
    sampler = DashboardSampler(SimpleNamespace(), num_samples=3)
    sampler.reference = _FixedRoofline()
    steps = StepCounters()
    sampler.observe(_stats(steps), 1.0)
    sample = sampler.observe(_stats(steps), 2.0)
    assert sample.num_steps == 0 and sample.batch_size == 0.0 and sample.step is None
    assert sample.roofline_tok_s is None and sample.roofline_fraction is None and sample.prefix_cache_hit_rate is None


def test_the_ring_keeps_the_newest_samples():
    sampler = DashboardSampler(SimpleNamespace(), num_samples=3)
    for t in range(6):
        sampler.observe(_stats(StepCounters()), float(t))
    assert [s.time for s in sampler.samples] == [3.0, 4.0, 5.0]


def test_gpu_names_map_to_presets():
    assert gpu_preset_name("NVIDIA H200") == "h200"
    assert gpu_preset_name("NVIDIA A100-SXM4-80GB") == "a100-80gb"
    assert gpu_preset_name("NVIDIA A100-PCIE-40GB") == "a100-40gb"
    assert gpu_preset_name("Tesla T4") == "t4"
    assert gpu_preset_name("Some Future GPU") is None


def test_the_reference_is_the_planners_decode_rate():
    spec = model_presets()["smollm2-135m"]
    cpu = hardware_presets()["cpu"]
    ref = RooflineReference(spec, HardwareChoice(cpu, PRESET, "test"), get_weight_format("fp32"), "fp32")
    expected = predict_rates(spec, cpu, 8, 128, weight_format="fp32", kv_format="fp32", decode_context=128)
    assert ref.decode_tok_s(8, 128) == pytest.approx(expected.decode_tok_s)
    assert ref.decode_tok_s(64, 128) > 10 * ref.decode_tok_s(1, 128)  # weights are read once per step
    assert ref.describe()["source"] == PRESET


def test_local_hardware_is_the_calibration_profile_when_saved(tmp_path, monkeypatch):
    monkeypatch.setenv("ROOFLINE_CACHE_DIR", str(tmp_path))
    preset = local_hardware(torch.device("cpu"))
    assert preset.source == PRESET and preset.spec.name == "cpu" and "no calibration profile" in preset.detail
    profile = CalibrationProfile(device="cpu", num_threads=1, memory_bytes=8e9, read_bandwidth=20e9,
                                 copy_bandwidth=15e9, gemv_bandwidth=12e9, matmul_flops={"fp32": 1e11},
                                 disk_bandwidth=1e9, op_overhead_s=1e-6)
    save_profile(profile, tmp_path / "hardware-local.json")
    measured = local_hardware(torch.device("cpu"))
    assert measured.source == CALIBRATION and measured.spec.memory_bandwidth == 12e9
    assert measured.detail == str(tmp_path / "hardware-local.json")


# --- over HTTP, on the shared live server ---------------------------------------------------------------------
def test_pages_and_static_files_are_served_from_the_package(server):
    with httpx.Client(base_url=server.base_url) as c:  # pages need no key: the API calls they make do
        for path, marker in (("/", b"roofline playground"), ("/dashboard", b"roofline dashboard")):
            resp = c.get(path)
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
            assert marker in resp.content
            assert "default-src 'self'" in resp.headers["content-security-policy"]
        for name, kind in (("playground.js", "text/javascript"), ("dashboard.js", "text/javascript"),
                           ("common.js", "text/javascript"), ("style.css", "text/css")):
            resp = c.get(f"/static/{name}")
            assert resp.status_code == 200 and resp.headers["content-type"].startswith(kind) and resp.content
        page = c.get("/").text + c.get("/dashboard").text
        assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere
        for bad in ("/static/nope.js", "/static/..%2Fapp.py", "/static/ui.py"):
            resp = c.get(bad)
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"


def test_stats_need_the_api_key(server):
    with httpx.Client(base_url=server.base_url) as c:
        assert c.get("/dashboard/stats").status_code == 401
        resp = c.get("/dashboard/stats", headers={"Authorization": "Bearer wrong"})
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        assert resp.headers["www-authenticate"] == "Bearer"


def test_stats_report_the_engine_and_move_with_load(server, http):
    before = http.get("/dashboard/stats").json()
    assert before["model"] == server.model and before["capacity"] == 300 and before["interval_s"] == 1.0
    roofline = before["roofline"]
    assert roofline["source"] == PRESET and roofline["hardware"] == "cpu"  # tests keep no calibration profile
    assert roofline["weight_format"].startswith("gguf(")  # the default model's own Q4_1/Q8_0 mix
    engine_stats = server.ctx.engine.stats()
    since = time.time()  # the server's clock too: samples are stamped with Unix seconds
    assert before["totals"]["generated_tokens"] == engine_stats.num_generated_tokens
    resp = http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": True,
                                              "temperature": 0})
    assert resp.status_code == 200
    after_request = server.ctx.engine.stats()
    assert after_request.num_generated_tokens == engine_stats.num_generated_tokens + 12
    assert after_request.steps.num_steps >= engine_stats.steps.num_steps + 12  # one decode step per token
    assert after_request.steps.execute_s > engine_stats.steps.execute_s
    deadline = time.monotonic() + 5
    while True:  # the sampler takes one sample a second: wait for the one that saw the request
        report = http.get("/dashboard/stats", params={"since": since}).json()
        busy = [s for s in report["samples"] if s["generation_tok_s"] > 0]
        if busy or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert busy, "no sample saw the request"
    assert all(s["time"] > since for s in report["samples"])
    assert report["totals"]["generated_tokens"] == before["totals"]["generated_tokens"] + 12
    sample = busy[0]
    assert sample["num_steps"] > 0 and sample["batch_size"] >= 1 and sample["step"]["execute_ms"] > 0
    assert sample["kv_blocks_total"] == server.ctx.engine.engine.kv.num_blocks
    assert sample["roofline_tok_s"] > 0
    assert sample["roofline_fraction"] == pytest.approx(sample["generation_tok_s"] / sample["roofline_tok_s"])


def test_stats_since_must_be_a_number(http):
    for bad in ("soon", "nan", "inf"):
        resp = http.get("/dashboard/stats", params={"since": bad})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "since"
