"""Named ModelSpecs for models people plan for, with shapes from their published configs."""

from __future__ import annotations

from roofline.planner.formats import get_weight_format
from roofline.planner.model_spec import ModelSpec

LLAMA3_VOCAB = 128256
QWEN25_VOCAB = 152064
OPT_POSITION_OFFSET = 2  # OPT's learned position table has max_positions + 2 rows


def model_presets() -> dict[str, ModelSpec]:
    """Preset ModelSpecs by name (a fresh dict each call)."""
    bf16, fp16 = get_weight_format("bf16"), get_weight_format("fp16")
    presets = [
        ModelSpec("llama-3.1-8b", LLAMA3_VOCAB, 4096, 14336, 32, 32, 8, 128, 131072,
                  native_format=bf16),
        ModelSpec("llama-3.1-70b", LLAMA3_VOCAB, 8192, 28672, 80, 64, 8, 128, 131072,
                  native_format=bf16),
        ModelSpec("llama-3.1-405b", LLAMA3_VOCAB, 16384, 53248, 126, 128, 8, 128, 131072,
                  native_format=bf16),
        # Mistral-7B-v0.3 (v0.1 differs only in a 32000-token vocabulary).
        ModelSpec("mistral-7b", 32768, 4096, 14336, 32, 32, 8, 128, 32768, native_format=bf16),
        ModelSpec("qwen2.5-7b", QWEN25_VOCAB, 3584, 18944, 28, 28, 4, 128, 32768,
                  has_qkv_bias=True, native_format=bf16),
        ModelSpec("qwen2.5-72b", QWEN25_VOCAB, 8192, 29568, 80, 64, 8, 128, 32768,
                  has_qkv_bias=True, native_format=bf16),
        # OPT: multi-head attention, a 2-matrix ReLU MLP of width 4h, LayerNorm, biases
        # everywhere, learned positions and a tied LM head.
        ModelSpec("opt-175b", 50272, 12288, 4 * 12288, 96, 96, 96, 128, 2048,
                  tie_word_embeddings=True, is_gated_mlp=False, has_linear_bias=True,
                  norm_has_bias=True, num_learned_positions=2048 + OPT_POSITION_OFFSET,
                  native_format=fp16),
        ModelSpec("smollm2-135m", 49152, 576, 1536, 30, 9, 3, 64, 8192,
                  tie_word_embeddings=True, native_format=bf16),
    ]
    return {spec.name: spec for spec in presets}
