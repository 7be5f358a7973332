"""HardwareSpec presets, custom specs from files and flags, and the local profile."""

import json

import pytest

from roofline.errors import ConfigError
from roofline.planner.hardware import hardware_presets, with_overrides
from roofline.planner.hardware_source import load_hardware
from roofline.planner.profile import CalibrationProfile, default_profile_path, save_profile

PRESETS = ("t4", "l4", "a10g", "a100-40gb", "a100-80gb", "h100", "h200", "mi300x", "cpu")


def test_presets_exist_and_are_sane():
    presets = hardware_presets()
    assert set(PRESETS) <= set(presets)
    for spec in presets.values():
        assert spec.memory_bytes > spec.reserved_bytes > 0
        assert spec.flops_for("bf16") >= spec.flops_for("fp32") > 0
        assert spec.usd_per_hour > 0
    assert presets["h100"].memory_bandwidth == pytest.approx(3.35e12)
    assert presets["a100-40gb"].ridge_point("bf16") == pytest.approx(312e12 / 1.555e12)


def test_flops_fallbacks():
    t4 = hardware_presets()["t4"]
    assert t4.flops_for("bf16") == t4.flops["fp16"]  # no bf16: fp16 tensor cores stand in
    a100 = hardware_presets()["a100-80gb"]
    assert a100.flops_for("fp8") == a100.flops["bf16"]  # no fp8: dequantized to the best float


def test_hardware_from_json_and_yaml(tmp_path):
    spec_file = tmp_path / "mygpu.json"
    spec_file.write_text(json.dumps({"memory_bytes": "24GB", "memory_bandwidth": "900GB/s",
                                     "flops": {"bf16": "150T", "fp32": "30T"},
                                     "interconnect_bandwidth": "32GB/s", "usd_per_hour": 1.2}))
    spec = load_hardware(str(spec_file))
    assert spec.name == "mygpu" and spec.memory_bytes == 24e9 and spec.flops["bf16"] == 150e12
    yaml = pytest.importorskip("yaml")
    yaml_file = tmp_path / "big.yaml"
    yaml_file.write_text(yaml.safe_dump({"base": "h100", "name": "h100-cheap", "usd_per_hour": 2.0}))
    cheap = load_hardware(str(yaml_file))
    assert cheap.usd_per_hour == 2.0 and cheap.memory_bytes == hardware_presets()["h100"].memory_bytes


def test_bad_hardware_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown hardware"):
        load_hardware("tpu-v9")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "memory_bytes": 1e9, "bogus": 1}))
    with pytest.raises(ConfigError, match="unknown hardware fields"):
        load_hardware(str(bad))
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"memory_bytes": 1e9}))
    with pytest.raises(ConfigError, match="missing"):
        load_hardware(str(missing))


def test_overrides_merge_flops():
    h100 = hardware_presets()["h100"]
    spec = with_overrides(h100, {"memory_bytes": 40e9, "flops": {"bf16": 500e12}, "usd_per_hour": None})
    assert spec.memory_bytes == 40e9 and spec.flops["bf16"] == 500e12
    assert spec.flops["fp8"] == h100.flops["fp8"] and spec.usd_per_hour == h100.usd_per_hour


def test_local_without_profile_says_run_calibrate(tmp_path, monkeypatch):
    monkeypatch.setenv("ROOFLINE_CACHE_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="run `roofline calibrate` first"):
        load_hardware("local")


def test_local_uses_achievable_gemv_bandwidth(tmp_path, monkeypatch):
    monkeypatch.setenv("ROOFLINE_CACHE_DIR", str(tmp_path))
    profile = CalibrationProfile(device="cpu", num_threads=1, memory_bytes=16e9, read_bandwidth=18e9,
                                 copy_bandwidth=15e9, gemv_bandwidth=12.7e9, matmul_flops={"fp32": 1e11},
                                 disk_bandwidth=1e9, op_overhead_s=1e-6)
    save_profile(profile, default_profile_path())
    local = load_hardware("local")
    assert local.memory_bandwidth == 12.7e9 and local.is_cpu and local.host_link_bandwidth is None
    assert local.layer_overhead_s > 0


def test_cache_dir_respects_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("ROOFLINE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_profile_path().parent == tmp_path / "roofline"


def test_matmul_rate_interpolates_the_measured_curve_in_log_rows():
    cpu = hardware_presets()["cpu"]
    assert cpu.matmul_rate("fp32", 64) == cpu.flops_for("fp32")  # no curve: the peak
    assert not cpu.has_matmul_curve("fp32")
    measured = with_overrides(cpu, {"matmul_curve": {"bf16": ((1.0, 1e10), (16.0, 5e10), (256.0, 1e11))}})
    assert measured.has_matmul_curve("fp16") and not measured.has_matmul_curve("fp32")
    assert measured.matmul_rate("bf16", 0.5) == 1e10 and measured.matmul_rate("bf16", 1e4) == 1e11  # clamped
    assert measured.matmul_rate("bf16", 4) == pytest.approx(3e10)  # halfway from 1 to 16 in log rows
    assert measured.matmul_rate("fp16", 64) == pytest.approx(7.5e10)
    assert measured.prefill_overhead_s() == measured.layer_overhead_s
    assert with_overrides(cpu, {"prefill_layer_overhead_s": 2e-4}).prefill_overhead_s() == 2e-4


def test_local_profile_carries_the_runtime_costs(tmp_path, monkeypatch, rc):
    from dataclasses import asdict

    monkeypatch.setenv("ROOFLINE_CACHE_DIR", str(tmp_path))
    profile = CalibrationProfile(device="cpu", num_threads=2, memory_bytes=16e9, read_bandwidth=40e9,
                                 copy_bandwidth=40e9, gemv_bandwidth=24e9, matmul_flops={"fp32": 2e11},
                                 disk_bandwidth=1e9, op_overhead_s=1e-6, runtime=asdict(rc))
    save_profile(profile, default_profile_path())
    local = load_hardware("local")
    assert local.runtime == rc and local.layer_overhead_s == rc.layer_dispatch_s


def test_old_or_broken_profiles_say_run_calibrate_again(tmp_path, monkeypatch):
    monkeypatch.setenv("ROOFLINE_CACHE_DIR", str(tmp_path))
    path = default_profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "device": "cpu"}))
    with pytest.raises(ConfigError, match="old format: run `roofline calibrate` again"):
        load_hardware("local")
    profile = CalibrationProfile(device="cpu", num_threads=2, memory_bytes=16e9, read_bandwidth=40e9,
                                 copy_bandwidth=40e9, gemv_bandwidth=24e9, matmul_flops={"fp32": 2e11},
                                 disk_bandwidth=1e9, op_overhead_s=1e-6, runtime={"dtype": "fp32"})
    save_profile(profile, path)
    with pytest.raises(ConfigError, match="unreadable .*run `roofline calibrate` again"):
        load_hardware("local")


def test_curve_in_a_hardware_file(tmp_path):
    spec_file = tmp_path / "box.json"
    spec_file.write_text(json.dumps({"base": "cpu", "matmul_curve": {"fp32": [[1, "10G"], [64, "100G"]]}}))
    assert load_hardware(str(spec_file)).matmul_rate("fp32", 64) == 1e11
