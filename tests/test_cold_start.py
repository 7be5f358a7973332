"""Start-up does no work that can wait: what `roofline generate` imports, the GGUF loader's mapped blocks and
its config read once (bench/cold_start.py measures the time; docs/benchmarks.md has the figures)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from roofline.loaders import open_model

# modules a plain `roofline generate` must not import: compilation (only with --compile), the server
# stack (only for serve), the reference implementation (tests and benchmarks only)
DEFERRED = ("torch._dynamo", "torch._inductor", "fastapi", "uvicorn", "starlette", "transformers",
            "roofline.server.app", "roofline.batch")

_PROBE = """
import gc, json, sys
from roofline import cli, engine_args

seen = []
make_llm = engine_args.make_llm
def spy(args):
    seen.append(gc.isenabled())
    llm = make_llm(args)
    seen.append(gc.isenabled())
    return llm
engine_args.make_llm = spy
sys.argv = ["roofline", *sys.argv[1:]]
code = cli.main()
print(json.dumps({"code": code, "loaded": [m for m in %r if m in sys.modules], "gc": seen + [gc.isenabled()],
                  "frozen": gc.get_freeze_count() > 0}))
""" % (DEFERRED,)


def test_generate_imports_nothing_it_does_not_use():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --kernels default: the built-in rule, no probe (the kernel cache is the selector tests' subject)
    proc = subprocess.run([sys.executable, "-c", _PROBE, "generate", "--model", "default", "--prompt", "Hi",
                           "--max-tokens", "2", "--threads", "1", "--kernels", "default", "--temperature", "0"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    *text, last = proc.stdout.strip().splitlines()
    result = json.loads(last)
    # the collector was off while the model loaded, then on, the start-up's objects frozen out of its scans
    assert result == {"code": 0, "loaded": [], "gc": [False, True, True], "frozen": True}
    assert "".join(text).strip()  # it did generate


def test_server_package_names_still_import():
    from roofline.server import ServerConfig, create_app
    from roofline.server.app import create_app as direct
    from roofline.server.config import ServerConfig as direct_config

    assert create_app is direct and ServerConfig is direct_config
    import roofline.server

    with pytest.raises(AttributeError):
        roofline.server.no_such_name  # noqa: B018


def test_gguf_model_config_is_read_once_and_each_caller_gets_its_own_copy():
    source = open_model("default")
    calls = []
    read = source._read_model_config
    source._read_model_config = lambda: calls.append(1) or read()
    first, second = source.model_config(), source.model_config()
    source.tokenizer()
    assert len(calls) == 1
    assert first == second and first is not second
    first.max_position_embeddings = 7
    assert source.model_config().max_position_embeddings != 7


def test_gguf_quantized_blocks_are_views_of_the_file_map():
    source = open_model("default")
    data = source.reader.data
    lo, hi = data.ctypes.data, data.ctypes.data + data.nbytes
    names = set(source.tensor_types())  # every tensor kept as blocks where it can be: norms are dequantized
    blocks = {name: t for name, t in source.tensors(torch.float32, names) if not isinstance(t, torch.Tensor)}
    plain = blocks["model.layers.0.self_attn.o_proj.weight"].blocks  # not permuted, so nothing to copy
    assert lo <= plain.data_ptr() < hi
    assert plain.shape == (576, plain.shape[1]) and plain.dtype == torch.uint8
    start = plain.data_ptr() - lo
    assert np.array_equal(plain.numpy(), np.asarray(data[start:start + plain.numel()]).reshape(plain.shape))
    permuted = blocks["model.layers.0.self_attn.q_proj.weight"].blocks  # rows reordered: a copy, off the map
    assert not lo <= permuted.data_ptr() < hi


def test_the_collector_stays_on_when_main_is_called_in_a_callers_process():
    from roofline import cli

    frozen = gc.get_freeze_count()
    assert cli.main(["generate", "--model", "/no/such/model", "--prompt", "Hi"]) == 2
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    # as the entry point: off for the load unless --compile, and never for the data-parallel router
    args = cli.build_parser("generate").parse_args(["generate", "--prompt", "Hi", "--compile"])
    cli._pause_gc_for_start_up(args)
    assert gc.isenabled()
    args = cli.build_parser().parse_args(["serve", "--data-parallel-size", "2"])
    cli._pause_gc_for_start_up(args)
    assert gc.isenabled()
    args = cli.build_parser("generate").parse_args(["generate", "--prompt", "Hi"])
    try:
        cli._pause_gc_for_start_up(args)
        assert not gc.isenabled()
    finally:
        from roofline import engine_args

        engine_args._gc_paused = False
        gc.enable()
