"""`roofline generate --profile trace.json`: a torch profiler Chrome trace of the generation."""

from __future__ import annotations

import json
import os

from roofline.cli import main


def test_generate_writes_a_chrome_trace(tmp_path, capsys):
    path = tmp_path / "trace.json"
    rc = main(["generate", "--prompt", "The sky is", "--max-tokens", "2", "--temperature", "0",
               "--kv-cache-memory", "64MiB", "--profile", str(path)])
    assert rc == 0
    captured = capsys.readouterr()
    assert captured.out.strip()  # the completion is still printed
    assert str(path) in captured.err
    with open(path) as f:
        trace = json.load(f)
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "roofline.generate" in names
    assert any(n and n.startswith("aten::") for n in names)


def test_a_bad_profile_path_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from roofline import engine_args

    def no_model(args):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(engine_args, "make_llm", no_model)
    missing = tmp_path / "no-such-folder" / "trace.json"
    assert main(["generate", "--prompt", "hi", "--profile", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("roofline: error: --profile") and "does not exist" in err and "\n" not in err
    assert main(["generate", "--prompt", "hi", "--profile", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not os.listdir(tmp_path)
