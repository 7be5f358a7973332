"""Tiny GGUF files in Q4_0 / Q4_1 / Q8_0 served natively ("auto") compute what their float values say.

The files are written by tests/loaders/test_gguf.py's `write_gguf` (q/k rows permuted the way llama.cpp's
converter does, tied and untied heads); roofline loads each once dequantized to fp32 ("none") and once
with the raw blocks decoded into the low-bit layers ("auto"), and the two must agree up to the kernels'
bf16 activations.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from roofline import LLM
from roofline.quant.embedding import Int8Embedding
from roofline.quant.linear import Int4Linear, Int8Linear


def _write_gguf():
    path = os.path.join(os.path.dirname(__file__), os.pardir, "loaders", "test_gguf.py")
    spec = importlib.util.spec_from_file_location("_loaders_test_gguf", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_gguf


@pytest.mark.parametrize("name, qtype, layer_type", [
    ("llama3-rope-scaling-gqa4", "Q8_0", Int8Linear),     # llama: q/k rows un-permuted as raw blocks
    ("llama-mha-bias-linear-rope", "Q4_0", Int4Linear),   # untied head, biases
    ("qwen2-bias-3heads-mqa-tied", "Q4_1", Int4Linear),   # tied head
])
def test_native_gguf_matches_its_dequantized_values(name, qtype, layer_type, tmp_path, reference,
                                                    dequantized_copy):
    from gguf import GGMLQuantizationType

    hf = reference.build_hf_model(reference.specs[name])
    path = str(tmp_path / f"{name}.gguf")
    _write_gguf()(hf, path, GGMLQuantizationType[qtype])
    kwargs = dict(dtype="float32", device="cpu", kv_cache_memory=2 << 20)
    floats, native = LLM(path, quantization="none", **kwargs), LLM(path, quantization="auto", **kwargs)
    model = native.engine.runner.model
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.gate_up_proj, layer_type) or (
        layer_type is Int4Linear and isinstance(layer.mlp.gate_up_proj, Int8Linear))  # a shape int4 cannot pack
    assert isinstance(model.model.embed_tokens, Int8Embedding)
    prompt = reference.random_prompt(48, seed=2)
    float_model = floats.engine.runner.model
    ours = reference.roofline_full_logits(model, prompt)
    # every block lands in the right rows (q/k un-permuted, shards packed, head tied or not): the same
    # logits as the float model given the values the low-bit layers hold, up to bf16 activations
    stored = reference.roofline_full_logits(dequantized_copy(float_model, model), prompt)
    assert reference.relative_error(ours, stored) < 0.06  # a misplaced block gives ~1
    # and those values are the file's: Q4 blocks exactly (bf16 scales aside), Q8_0 requantized per row
    assert reference.relative_error(ours, reference.roofline_full_logits(float_model, prompt)) < 0.1
