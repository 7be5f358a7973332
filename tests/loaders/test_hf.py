"""The Hugging Face directory loader: config fields, sharded safetensors, tokenizer files, and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from roofline.errors import ModelLoadError
from roofline.loaders import open_model

from loader_errors import expect_load_error

LLAMA3 = "llama3-rope-scaling-gqa4"
SHARDED = "mistral-gqa2-sharded"


def _copy(tiny_model_dirs, name: str, tmp_path) -> str:
    path = str(tmp_path / name)
    shutil.copytree(tiny_model_dirs[name], path)
    return path


def _edit_config(path: str, drop: tuple[str, ...] = (), **changes) -> None:
    with open(f"{path}/config.json") as f:
        config = json.load(f)
    for key in drop:
        del config[key]
    config.update(changes)
    with open(f"{path}/config.json", "w") as f:
        json.dump(config, f)


# ---- config.json ----

def test_reads_rope_parameters_as_transformers_5_writes_them(tiny_model_dirs):
    with open(f"{tiny_model_dirs[LLAMA3]}/config.json") as f:
        assert "rope_parameters" in json.load(f)  # the layout under test
    cfg = open_model(tiny_model_dirs[LLAMA3]).model_config()
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling["rope_type"] == "llama3"
    assert (cfg.rope_scaling["factor"], cfg.rope_scaling["low_freq_factor"], cfg.rope_scaling["high_freq_factor"],
            cfg.rope_scaling["original_max_position_embeddings"]) == (8.0, 1.0, 4.0, 32)


def test_reads_rope_settings_in_the_older_top_level_layout(tiny_model_dirs, tmp_path):
    path = _copy(tiny_model_dirs, LLAMA3, tmp_path)
    scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
               "original_max_position_embeddings": 16}
    _edit_config(path, drop=("rope_parameters",), rope_theta=250000.0, rope_scaling=scaling)
    cfg = open_model(path).model_config()
    assert cfg.rope_theta == 250000.0
    assert cfg.rope_scaling == scaling


def test_default_rope_parameters_mean_no_scaling(tiny_model_dirs):
    cfg = open_model(tiny_model_dirs["qwen3-qknorm-headdim32"]).model_config()
    assert cfg.rope_scaling is None
    assert cfg.rope_theta == 10000.0
    assert (cfg.head_dim, cfg.qk_norm, cfg.attention_bias) == (32, True, False)


def test_null_rope_parameters_fall_back_to_defaults(tiny_model_dirs, tmp_path):
    path = _copy(tiny_model_dirs, LLAMA3, tmp_path)
    _edit_config(path, rope_parameters=None)
    cfg = open_model(path).model_config()
    assert (cfg.rope_theta, cfg.rope_scaling) == (10000.0, None)


def test_qwen2_has_qkv_bias_by_default(tiny_model_dirs):
    assert open_model(tiny_model_dirs["qwen2-bias-3heads-mqa-tied"]).model_config().attention_bias


def test_eos_ids_come_from_config_and_generation_config(tiny_model_dirs, tmp_path):
    path = _copy(tiny_model_dirs, LLAMA3, tmp_path)
    with open(f"{path}/generation_config.json", "w") as f:
        json.dump({"eos_token_id": [2, 4]}, f)
    assert open_model(path).model_config().eos_token_ids == [2, 4]


# ---- weights ----

def test_sharded_checkpoint_yields_every_tensor_of_the_index(tiny_model_dirs):
    source = open_model(tiny_model_dirs[SHARDED])
    with open(f"{tiny_model_dirs[SHARDED]}/model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 1
    tensors = dict(source.tensors(torch.float32))
    assert set(tensors) == set(weight_map)
    assert source.num_tensors() == len(weight_map)
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_tensors_are_cast_to_the_compute_dtype(tiny_model_dirs):
    name, tensor = next(open_model(tiny_model_dirs[LLAMA3]).tensors(torch.bfloat16))
    assert tensor.dtype == torch.bfloat16


# ---- tokenizer files ----

def test_tokenizer_takes_chat_template_and_specials_from_tokenizer_config(tiny_model_dirs):
    tok = open_model(tiny_model_dirs[LLAMA3]).tokenizer()
    assert tok.encode("w7 w9 <|im_end|>") == [7, 9, 4]
    assert tok.decode([7, 9, 4]) == "w7 w9"
    assert tok.info.bos_token_id == 1 and 2 in tok.eos_token_ids
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_jinja_file_is_used(tiny_model_dirs, tmp_path):
    path = _copy(tiny_model_dirs, LLAMA3, tmp_path)
    with open(f"{path}/chat_template.jinja", "w") as f:
        f.write("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    tok = open_model(path).tokenizer()
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi\n"


def test_missing_tokenizer_json_is_aexpect_load_error(tiny_model_dirs, tmp_path):
    path = _copy(tiny_model_dirs, LLAMA3, tmp_path)
    (tmp_path / LLAMA3 / "tokenizer.json").unlink()
    expect_load_error(path, "tokenizer.json")


# ---- bad input: each a one-line ModelLoadError, never a torch/safetensors/json traceback ----

def test_missing_path(tmp_path):
    expect_load_error(str(tmp_path / "nowhere"), "not found")


def test_directory_without_config_json(tmp_path):
    expect_load_error(str(tmp_path), "config.json")


def test_unsupported_architecture_lists_the_supported_ones(tiny_model_dirs, tmp_path):
    path = _copy(tiny_model_dirs, LLAMA3, tmp_path)
    _edit_config(path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    message = expect_load_error(path, "GPT2LMHeadModel", "not supported")
    for supported in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert supported in message


def test_config_json_that_is_not_json(tiny_model_dirs, tmp_path):
    path = _copy(tiny_model_dirs, LLAMA3, tmp_path)
    (tmp_path / LLAMA3 / "config.json").write_text("{not json")
    expect_load_error(path, "config.json")


def test_config_json_that_is_a_list(tiny_model_dirs, tmp_path):
    path = _copy(tiny_model_dirs, LLAMA3, tmp_path)
    (tmp_path / LLAMA3 / "config.json").write_text("[1, 2]")
    expect_load_error(path, "config.json", "JSON object", "list")


@pytest.mark.parametrize("field,value", [("hidden_size", "64"), ("num_hidden_layers", 2.5), ("vocab_size", True),
                                         ("num_attention_heads", [4]), ("intermediate_size", None)])
def test_config_json_field_of_the_wrong_type(tiny_model_dirs, tmp_path, field, value):
    path = _copy(tiny_model_dirs, LLAMA3, tmp_path)
    _edit_config(path, **{field: value})
    expect_load_error(path, "config.json", field)


def test_config_json_too_large_for_memory_is_refused_before_allocating(tiny_model_dirs, tmp_path):
    # 1e12 x 1e6 parameters: the one-line error says what loading would need, nothing is allocated
    path = _copy(tiny_model_dirs, LLAMA3, tmp_path)
    _edit_config(path, vocab_size=1e12, hidden_size=1e6, intermediate_size=4e6, head_dim=None)
    expect_load_error(path, "needs", "GiB", "available")


def test_config_json_missing_a_field(tiny_model_dirs, tmp_path):
    path = _copy(tiny_model_dirs, LLAMA3, tmp_path)
    _edit_config(path, drop=("hidden_size",))
    expect_load_error(path, "hidden_size")


def test_unsupported_mlp_bias(tiny_model_dirs, tmp_path):
    path = _copy(tiny_model_dirs, LLAMA3, tmp_path)
    _edit_config(path, mlp_bias=True)
    expect_load_error(path, "mlp_bias")


def test_checkpoint_that_does_not_fit_the_config(tiny_model_dirs, tmp_path):
    path = _copy(tiny_model_dirs, LLAMA3, tmp_path)
    _edit_config(path, intermediate_size=96)
    expect_load_error(path, "mlp")


def test_checkpoint_with_a_bias_the_architecture_lacks(tiny_model_dirs, tmp_path):
    path = _copy(tiny_model_dirs, "llama-mha-bias-linear-rope", tmp_path)
    _edit_config(path, attention_bias=False)
    expect_load_error(path, "bias")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors(tiny_model_dirs, tmp_path, damage):
    path = _copy(tiny_model_dirs, LLAMA3, tmp_path)
    weights = tmp_path / LLAMA3 / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"\x10\x00" + b"\xff" * 100,
                         "empty": b""}[damage])
    expect_load_error(path, "model.safetensors")
    with pytest.raises(ModelLoadError):
        open_model(path).num_tensors()


def test_shard_listed_in_the_index_is_missing(tiny_model_dirs, tmp_path):
    path = _copy(tiny_model_dirs, SHARDED, tmp_path)
    (tmp_path / SHARDED / "model-00002-of-00014.safetensors").unlink()
    expect_load_error(path, "model-00002-of-00014.safetensors")


def test_pickled_weights_are_not_loaded(tiny_model_dirs, tmp_path):
    path = _copy(tiny_model_dirs, LLAMA3, tmp_path)
    (tmp_path / LLAMA3 / "model.safetensors").rename(tmp_path / LLAMA3 / "pytorch_model.bin")
    expect_load_error(path, "safetensors")


def test_a_file_that_is_neither_gguf_nor_a_directory(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    expect_load_error(str(path), "not a GGUF file")
