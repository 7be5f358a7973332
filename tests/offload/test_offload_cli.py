"""The engine flags: --memory-limit, --offload and --offload-dir on generate; one-line errors with exit 2."""

from __future__ import annotations

import dataclasses

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
