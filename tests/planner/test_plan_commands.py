"""`roofline plan` and `roofline calibrate` end to end through their argparse handlers."""

import argparse
import json

import pytest

from roofline.planner.commands import add_calibrate_parser, add_plan_parser


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="roofline")
    subparsers = parser.add_subparsers(required=True)
    add_plan_parser(subparsers)
    add_calibrate_parser(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


def test_plan_70b_on_4_h100_prints_a_table(capsys):
    code = run(["plan", "llama-3.1-70b", "--hardware", "h100", "--count", "4", "--slo", "ttft=1s,tpot=50ms"])
    out = capsys.readouterr().out
    assert code == 0
    assert "quant" in out and "tpot" in out and "-bound at batch" in out
    assert "4 x h100" in out


def test_plan_json_parses(capsys):
    code = run(["plan", "llama-3.1-70b", "--hardware", "h100", "--count", "4", "--slo",
                "ttft=1s,tpot=50ms", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["is_slo_met"] and doc["plans"]
    plan = doc["plans"][0]
    assert plan["memory"]["total"] <= doc["hardware"]["memory_bytes"]
    assert plan["prediction"]["tpot_s"] <= 0.05


def test_plan_user_errors_exit_2(capsys):
    assert run(["plan", "llama-3.1-70b", "--hardware", "nope"]) == 2
    assert run(["plan", "llama-3.1-70b", "--hardware", "h100", "--slo", "fast"]) == 2
    assert run(["plan", "smollm2-135m", "--hardware", "h100", "--context", "100000"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "Traceback" not in err


def test_plan_with_hardware_overrides(capsys):
    code = run(["plan", "llama-3.1-8b", "--hardware", "h100", "--memory", "40GB", "--price", "1",
                "--flops", "bf16=500T", "--quant", "bf16", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["hardware"]["memory_bytes"] == 40e9 and doc["hardware"]["usd_per_hour"] == 1
    assert {plan["weight_format"] for plan in doc["plans"]} == {"bf16"}


def test_unmeetable_slo_exits_1(capsys):
    assert run(["plan", "llama-3.1-70b", "--hardware", "h100", "--count", "4", "--slo", "tpot=1us"]) == 1
    assert "no plan meets SLO" in capsys.readouterr().out


def test_plot_needs_matplotlib_or_writes_a_png(tmp_path, capsys):
    target = tmp_path / "roofline.png"
    code = run(["plan", "llama-3.1-8b", "--hardware", "a100-80gb", "--plot", str(target)])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert code == 2 and "matplotlib" in capsys.readouterr().err
        return
    assert code == 0 and target.stat().st_size > 0


def test_calibrate_quick_then_plan_local(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROOFLINE_CACHE_DIR", str(tmp_path))
    assert run(["calibrate", "--quick"]) == 0
    assert "saved" in capsys.readouterr().out
    profile = json.loads((tmp_path / "hardware-local.json").read_text())
    assert profile["gemv_bandwidth"] > 0 and profile["matmul_flops"]["fp32"] > 0
    assert profile["disk_bandwidth"] > 0 and profile["is_quick"]
    runtime = profile["runtime"]
    for width, points in [pair for kind in ("layer_curves", "head_curves") for curves in runtime[kind].values()
                          for pair in curves]:
        rows = [point[0] for point in points]
        assert width > 0 and rows == sorted(rows) and rows[0] == 1 and all(rate > 0 for _, rate in points)
    assert runtime["decode_kv_bandwidth"] > 0 and runtime["element_s"] >= 0 and runtime["layer_dispatch_s"] >= 0
    assert run(["plan", "smollm2-135m", "--hardware", "local", "--context", "512"]) == 0
    assert "1 x local" in capsys.readouterr().out


def test_calibrate_output_path(tmp_path, capsys):
    target = tmp_path / "sub" / "profile.json"
    assert run(["calibrate", "--quick", "--output", str(target), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 2 and target.is_file()


@pytest.mark.parametrize("model", ["opt-175b", "qwen2.5-72b", "mistral-7b", "llama-3.1-405b"])
def test_plan_every_preset_model(model, capsys):
    assert run(["plan", model, "--hardware", "h200", "--count", "8"]) == 0
    assert model in capsys.readouterr().out
