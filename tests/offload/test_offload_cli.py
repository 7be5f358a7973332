"""The engine flags: --memory-limit, --offload and --offload-dir on generate; one-line errors with exit 2."""

from __future__ import annotations

import dataclasses
import json

import pytest

from roofline.cli import main


@pytest.fixture(scope="module")
def tiny_dir(reference, tmp_path_factory) -> str:
    spec = reference.specs["llama-mha-bias-linear-rope"]
    spec = dataclasses.replace(spec, config={**spec.config, "num_hidden_layers": 4})
    path = str(tmp_path_factory.mktemp("offload-cli"))
    reference.save_tiny_model(spec, path, seed=7)
    return path


def _generate(tiny_dir: str, *flags: str) -> list[str]:
    return ["generate", "--model", tiny_dir, "--prompt", "w5 w6 w7", "--max-tokens", "4", "--temperature", "0",
            "--max-model-len", "64", "--max-num-seqs", "8", *flags]


def test_a_memory_limit_prints_the_placement_and_gives_the_resident_text(tiny_dir, capsys, tmp_path):
    assert main(_generate(tiny_dir)) == 0
    resident = capsys.readouterr().out
    assert main(_generate(tiny_dir, "--memory-limit", "1MB", "--offload-dir", str(tmp_path))) == 0
    captured = capsys.readouterr()
    assert captured.out == resident
    assert "roofline: offload w25/0/75 kv100/0: predicted" in captured.err
    assert main(_generate(tiny_dir, "--offload", "w=0/100/0")) == 0
    assert capsys.readouterr().out == resident


@pytest.mark.parametrize("flags, message", [
    (("--memory-limit", "400KB"), "roofline: error: the model needs at least 692.74 KB even with every layer"),
    (("--offload", "w=10/10"), "roofline: error: offload placement 'w=10/10': write w=DEVICE/HOST/DISK"),
    (("--offload", "all"), "roofline: error: offload must be auto, none or a placement"),
])
def test_what_cannot_run_is_one_line_and_exit_2(tiny_dir, capsys, flags, message):
    assert main(_generate(tiny_dir, *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_plan_with_a_memory_limit_names_the_placement_generate_runs(tiny_dir, capsys, tmp_path):
    plan = ["plan", tiny_dir, "--memory-limit", "1MB", "--max-model-len", "64", "--max-num-seqs", "8"]
    assert main([*plan, "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["placement"] == "w25/0/75 kv100/0" and planned["predicted_tok_s"] > 0
    assert main(_generate(tiny_dir, "--memory-limit", "1MB", "--offload-dir", str(tmp_path))) == 0
    assert planned["start_up_line"] in capsys.readouterr().err  # the same placement, batch and predicted rate
    assert main(plan) == 0
    table = capsys.readouterr().out
    assert "placement   w25/0/75 kv100/0" in table and planned["start_up_line"] in table


@pytest.mark.parametrize("flags, message", [
    (("--memory-limit", "400KB"), "error: the model needs at least 692.74 KB even with every layer"),
    (("--memory-limit", "1MB", "--hardware", "h100"), "error: --memory-limit plans what the engine would run on"),
])
def test_plan_with_a_limit_that_cannot_run_is_one_line_and_exit_2(tiny_dir, capsys, flags, message):
    assert main(["plan", tiny_dir, "--max-model-len", "64", "--max-num-seqs", "8", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_plan_with_a_limit_refuses_a_preset(capsys):
    assert main(["plan", "llama-3.1-8b", "--memory-limit", "8GB"]) == 2
    assert capsys.readouterr().err.startswith("error: --memory-limit needs the model itself")
