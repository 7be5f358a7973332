"""Quantization planning, the module swap, and whole tiny models loaded quantized through the engine."""

from __future__ import annotations

import pytest

from roofline import LLM
from roofline.config import ModelConfig, QuantConfig
from roofline.errors import ConfigError
from roofline.layers.embedding import LMHead
from roofline.layers.linear import Linear
from roofline.models.llama import LlamaForCausalLM
from roofline.quant import LinearScheme, plan_quantization, quantize_model, weight_bytes
from roofline.quant.embedding import Int8Embedding, Int8LMHead
from roofline.quant.linear import Int4Linear, Int8Linear

CFG = ModelConfig(architecture="llama", vocab_size=256, hidden_size=96, intermediate_size=160, num_layers=2,
                  num_heads=3, num_kv_heads=1, head_dim=32, max_position_embeddings=64, tie_word_embeddings=True)


def _types(default: str) -> dict[str, str]:
    """GGUF-style tensor types under HF checkpoint names, every weight of type `default`."""
    types = {"model.embed_tokens.weight": default, "model.norm.weight": "F32"}
    for i in range(CFG.num_layers):
        for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            types[f"model.layers.{i}.{leaf}.weight"] = default
    return types


def test_none_and_float_checkpoints_stay_as_they_are():
    model = LlamaForCausalLM(CFG)
    assert plan_quantization(model, "none", 32, _types("Q4_1")).is_empty
    assert plan_quantization(model, "auto", 32, None).is_empty
    assert plan_quantization(model, "auto", 32, _types("F16")).is_empty


def test_auto_keeps_the_gguf_precision():
    model = LlamaForCausalLM(CFG)
    types = _types("Q4_1")
    types["model.layers.1.self_attn.v_proj.weight"] = "Q6_K"  # one shard of a packed module is finer
    types["model.layers.1.mlp.down_proj.weight"] = "F16"
    types["model.embed_tokens.weight"] = "Q8_0"
    plan = plan_quantization(model, "auto", 128, types)
    s = plan.schemes
    assert s["model.layers.0.self_attn.qkv_proj"] == LinearScheme("int4", 32)  # the file's groups, not 128
    assert s["model.layers.1.self_attn.qkv_proj"].kind == "int8"  # the finest shard wins
    assert "model.layers.1.mlp.down_proj" not in s  # F16 stays floating point
    assert s["model.embed_tokens"].kind == "int8" and "lm_head" not in s  # the tied head follows the embedding
    assert "model.layers.0.self_attn.q_proj.weight" in plan.raw_tensor_names
    assert "model.layers.1.mlp.down_proj.weight" not in plan.raw_tensor_names


def test_int4_falls_back_to_a_group_that_divides_the_input():
    model = LlamaForCausalLM(CFG)
    s = plan_quantization(model, "int4", 128, None).schemes
    assert s["model.layers.0.self_attn.qkv_proj"].group_size == 32  # 96 = 3 x 32
    assert s["model.layers.0.mlp.down_proj"].group_size == 32  # 160 = 5 x 32
    assert s["lm_head"].kind == "int8" if "lm_head" in s else True
    model64 = LlamaForCausalLM(ModelConfig(**{**CFG.__dict__, "hidden_size": 80, "head_dim": 16}))
    assert plan_quantization(model64, "int4", 64, None).schemes["model.layers.0.self_attn.qkv_proj"].kind == "int8"


def test_quantize_model_swaps_modules_and_ties_the_head():
    model = LlamaForCausalLM(CFG)
    quantize_model(model, plan_quantization(model, "int4", 32, None))
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Int4Linear) and layer.self_attn.qkv_proj.output_sizes == [96, 32, 32]
    assert isinstance(layer.mlp.gate_up_proj, Int4Linear)
    assert isinstance(model.model.embed_tokens, Int8Embedding)
    assert isinstance(model.lm_head, Int8LMHead) and model.lm_head.weights is model.model.embed_tokens
    assert not any(type(m) in (Linear, LMHead) for m in model.modules())
    untied = LlamaForCausalLM(ModelConfig(**{**CFG.__dict__, "tie_word_embeddings": False}))
    quantize_model(untied, plan_quantization(untied, "int8", 32, None))
    assert isinstance(untied.lm_head, Int8LMHead) and not untied.lm_head.is_tied
    assert isinstance(untied.model.layers[1].mlp.down_proj, Int8Linear)


def test_quant_config_validates():
    with pytest.raises(ConfigError, match="quantization"):
        QuantConfig(method="fp8")
    with pytest.raises(ConfigError, match="group size"):
        QuantConfig(group_size=48)


@pytest.fixture(scope="module")
def tiny_llms(tiny_model_dirs):
    """name -> {method: LLM} for three tiny models (tied/untied, bias, q/k norm)."""
    names = ["llama-mha-bias-linear-rope", "qwen2-bias-3heads-mqa-tied", "qwen3-qknorm-5heads-bias-untied"]
    return {name: {m: LLM(tiny_model_dirs[name], quantization=m, dtype="float32", device="cpu",
                          kv_cache_memory=4 << 20) for m in ("none", "int8", "int4")} for name in names}


@pytest.mark.parametrize("name", ["llama-mha-bias-linear-rope", "qwen2-bias-3heads-mqa-tied",
                                  "qwen3-qknorm-5heads-bias-untied"])
def test_tiny_models_compute_with_the_weights_they_store(tiny_llms, reference, dequantized_copy, name):
    # every shard, bias, tie and fallback lands where it belongs: the quantized model's logits equal
    # those of the float model given the dequantized weights, up to the kernels' bf16 activations
    llms = tiny_llms[name]
    prompt = reference.random_prompt(40, seed=3)
    float_model = llms["none"].engine.runner.model
    for method in ("int8", "int4"):
        runner = llms[method].engine.runner
        assert runner.weight_bytes < llms["none"].engine.runner.weight_bytes / 2
        ours = reference.roofline_full_logits(runner.model, prompt)
        ref = reference.roofline_full_logits(dequantized_copy(float_model, runner.model), prompt)
        assert reference.relative_error(ours, ref) < 0.06, method  # bf16 activations; a misplaced shard: ~1


def test_weight_bytes_counts_quantized_storage_once():
    model = LlamaForCausalLM(CFG)
    quantize_model(model, plan_quantization(model, "int8", 32, None))
    emb = model.model.embed_tokens
    assert weight_bytes(model) >= emb.qweight.numel() + 4 * emb.scale.numel()
    assert weight_bytes(model) < sum(p.numel() for p in LlamaForCausalLM(CFG).parameters()) * 4 / 3
