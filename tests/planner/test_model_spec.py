"""ModelSpec arithmetic against hand-computed values."""

import json

import pytest

from roofline.config import ModelConfig
from roofline.errors import ModelLoadError
from roofline.planner.formats import get_weight_format, weight_formats
from roofline.planner.model_presets import model_presets
from roofline.planner.model_source import load_model_spec
from roofline.planner.model_spec import spec_from_config

BF16 = get_weight_format("bf16")


def test_llama_8b_parameters_weights_and_kv():
    spec = model_presets()["llama-3.1-8b"]
    # attention 4096*128*(2*32 + 2*8) + MLP 3*4096*14336 + 2 norms, x32, + 2 tables of 128256 x 4096
    per_layer = 4096 * 128 * 80 + 3 * 4096 * 14336 + 2 * 4096
    assert spec.num_params == 32 * per_layer + 2 * 128256 * 4096 + 4096
    assert spec.num_params == pytest.approx(8.03e9, rel=0.005)
    assert spec.weight_bytes(BF16) == pytest.approx(16.06e9, rel=0.001)
    assert spec.kv_bytes_per_token(2) == 128 * 1024  # 2 (K,V) * 32 layers * 8 heads * 128 * 2 bytes


def test_opt_175b_is_mha_with_two_matrix_mlp_and_350_gb_fp16():
    spec = model_presets()["opt-175b"]
    assert spec.num_kv_heads == spec.num_heads and not spec.is_gated_mlp
    # 12 h^2 per layer dominates: 96 * 12 * 12288^2 = 1.739e11
    assert spec.num_params == pytest.approx(175e9, rel=0.01)
    assert spec.weight_bytes(get_weight_format("fp16")) == pytest.approx(350e9, rel=0.01)
    # MHA: 2 * 96 layers * 96 heads * 128 * 2 bytes = 4.5 MiB per token
    assert spec.kv_bytes_per_token(2) == 2 * 96 * 96 * 128 * 2


def test_spec_from_config_matches_model_config_count():
    config = ModelConfig(architecture="qwen3", vocab_size=1000, hidden_size=64, intermediate_size=128,
                         num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                         max_position_embeddings=512, attention_bias=True, qk_norm=True)
    assert spec_from_config(config).num_params == config.num_params


def test_smollm2_preset_matches_default_gguf():
    preset = model_presets()["smollm2-135m"]
    default = load_model_spec("default")
    assert default.num_params == preset.num_params == pytest.approx(134.5e6, rel=0.001)
    # Q4_1 layers (5 bits) and a Q8_0 embedding (8.5 bits): between the two.
    assert 5.0 < default.native_format.bits_per_weight < 8.5


def test_quantization_never_grows_weight_bytes():
    spec = model_presets()["llama-3.1-70b"]
    for fmt in weight_formats().values():
        if fmt.name != "fp32":
            assert spec.weight_bytes(fmt) <= spec.weight_bytes(BF16)
    formats = weight_formats()
    assert formats["int4"].bits_per_weight == pytest.approx(4.25)  # fp16 scale + zero per 128
    assert formats["q4_1"].bits_per_weight == pytest.approx(5.0)  # 20 bytes per 32 weights
    assert formats["q8_0"].bits_per_weight == pytest.approx(8.5)


def test_flops_per_token_is_two_per_parameter_plus_attention():
    spec = model_presets()["llama-3.1-8b"]
    short = spec.decode_flops_per_token(0)
    assert short == pytest.approx(2 * spec.decode_read_params(), rel=0.001)
    # 4 * layers * heads * head_dim FLOPs per attended token
    assert spec.decode_flops_per_token(1000) - short == 4 * 32 * 32 * 128 * 1000
    # prefill: the LM head runs once, attention over a causal triangle
    assert spec.prefill_flops(10) == pytest.approx(
        10 * spec.matmul_flops_per_token + spec.lm_head_flops + spec.attention_flops(55))


def test_hf_config_reader(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "torch_dtype": "bfloat16"}))
    spec = load_model_spec(str(tmp_path))
    assert spec.head_dim == 16 and spec.has_qkv_bias
    assert spec.native_format.name == "bf16"


def test_unknown_model_is_a_one_line_error():
    with pytest.raises(ModelLoadError, match="no such preset or path"):
        load_model_spec("no-such-model")
