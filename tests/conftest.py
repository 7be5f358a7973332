"""Shared fixtures: tiny random-weight Hugging Face models saved to disk, and a full-logits helper.

transformers is the correctness reference; it is a dev dependency only and is imported lazily here so
tests that do not need it never pay for the import.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

# kernel timings go to a per-run folder, never the user's ~/.cache (shared by the whole run: one probe per shape)
os.environ.setdefault("ROOFLINE_CACHE_DIR", os.path.join(__import__("tempfile").mkdtemp(prefix="roofline-test-"), "cache"))

VOCAB_SIZE = 512
# the first ids of every tiny vocabulary are special tokens
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
BOS_ID, EOS_ID = 1, 2
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass(frozen=True)
class TinyModelSpec:
    """One tiny model: a transformers family and the config fields that give it its shape."""

    family: str  # "llama", "mistral", "qwen2", "qwen3"
    config: dict = field(default_factory=dict)  # extra config kwargs (heads, head_dim, rope, tying, ...)
    max_shard_size: str | None = None  # set to save a sharded checkpoint with an index


# Shapes chosen to cover: odd head counts, MHA / 2:1 / 4:1 / MQA, head_dim != hidden / heads,
# tied and untied embeddings, q/k/v(/o) bias, q/k norm, rope theta variants, linear and llama3
# rope scaling, a sharded checkpoint.
TINY_MODELS: dict[str, TinyModelSpec] = {
    "llama-mha-bias-linear-rope": TinyModelSpec("llama", dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
        attention_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama-5heads-mqa-tied": TinyModelSpec("llama", dict(hidden_size=80, num_attention_heads=5,
                                                         num_key_value_heads=1, tie_word_embeddings=True,
                                                         rope_theta=100000.0)),
    "llama3-rope-scaling-gqa4": TinyModelSpec("llama", dict(
        hidden_size=128, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
        rope_theta=500000.0, max_position_embeddings=128,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})),
    "mistral-gqa2-sharded": TinyModelSpec("mistral", dict(hidden_size=96, num_attention_heads=6,
                                                          num_key_value_heads=3, sliding_window=None,
                                                          tie_word_embeddings=False, rope_theta=1000000.0),
                                          max_shard_size="50KB"),
    "qwen2-bias-3heads-mqa-tied": TinyModelSpec("qwen2", dict(hidden_size=96, num_attention_heads=3,
                                                              num_key_value_heads=1, tie_word_embeddings=True,
                                                              rope_theta=1000000.0)),
    "qwen3-qknorm-headdim32": TinyModelSpec("qwen3", dict(hidden_size=64, num_attention_heads=4,
                                                          num_key_value_heads=2, head_dim=32,
                                                          tie_word_embeddings=True)),
    "qwen3-qknorm-5heads-bias-untied": TinyModelSpec("qwen3", dict(hidden_size=64, num_attention_heads=5,
                                                                   num_key_value_heads=5, head_dim=24,
                                                                   attention_bias=True, tie_word_embeddings=False,
                                                                   rope_theta=20000.0)),
}


def _hf_classes(family: str):
    import transformers

    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    return getattr(transformers, f"{names}Config"), getattr(transformers, f"{names}ForCausalLM")


def build_hf_model(spec: TinyModelSpec, seed: int = 0):
    """A transformers model of `spec` with random weights large enough to give well-separated logits."""
    config_cls, model_cls = _hf_classes(spec.family)
    kwargs = dict(vocab_size=VOCAB_SIZE, intermediate_size=160, num_hidden_layers=2, max_position_embeddings=256,
                  bos_token_id=BOS_ID, eos_token_id=EOS_ID, rms_norm_eps=1e-6)
    kwargs.update(spec.config)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # non-unit norm weights, so a norm that is skipped shows
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):  # transformers zero-initialises biases, which would hide them
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.15)
    return model


def write_tiny_tokenizer(path: str, vocab_size: int = VOCAB_SIZE) -> None:
    """A word-level tokenizer.json over `vocab_size` tokens plus a tokenizer_config.json with a chat template."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    words = SPECIAL_TOKENS + [f"w{i}" for i in range(len(SPECIAL_TOKENS), vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False,
                   "chat_template": CHAT_TEMPLATE}, f)


def save_tiny_model(spec: TinyModelSpec, path: str, seed: int = 0) -> None:
    """Build `spec`, save it as safetensors (sharded when asked) and add a tokenizer."""
    model = build_hf_model(spec, seed)
    kwargs = {"max_shard_size": spec.max_shard_size} if spec.max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    write_tiny_tokenizer(path)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    """Every TINY_MODELS entry saved once per session: name -> directory."""
    dirs = {}
    for i, (name, spec) in enumerate(TINY_MODELS.items()):
        path = str(tmp_path_factory.mktemp(name))
        save_tiny_model(spec, path, seed=i)
        dirs[name] = path
    return dirs


def load_hf_reference(path: str, **kwargs):
    """The saved model loaded back by transformers in fp32 (the reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    model.generation_config.eos_token_id = None  # generate() merges this default into any config it is given
    return model


def load_roofline_model(model: str, **config_changes) -> torch.nn.Module:
    """A roofline model for `model` in fp32 on the CPU, optionally with ModelConfig fields replaced."""
    from roofline.loaders import open_model
    from roofline.models.registry import model_class

    source = open_model(model)
    cfg = dataclasses.replace(source.model_config(), **config_changes)
    net = model_class(cfg)(cfg)
    net.load_weights(source.tensors(torch.float32))
    return net.eval()


@torch.inference_mode()
def roofline_full_logits(model, token_ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits of a roofline model at every position of one sequence, prefilled in one chunk: [T, vocab].

    Uses a KV cache of its own, so an engine's cache is left untouched.
    """
    from roofline.layers.attention import AttentionMetadata, PrefillChunk

    cfg = model.config
    T = len(token_ids)
    shape = (cfg.num_kv_heads, math.ceil(T / block_size), block_size, cfg.head_dim)
    kv_caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_layers)]
    # positional: slot mapping, no decode tokens (no decode table, no mask), one prefill with nothing cached
    meta = AttentionMetadata(torch.arange(T), 0, None, None, prefills=[PrefillChunk(0, T, T, None, None)])
    hidden = model(torch.tensor(token_ids), torch.arange(T), kv_caches, meta)  # [T, hidden]
    return model.compute_logits(hidden)


@torch.inference_mode()
def hf_full_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    """transformers' logits at every position: [T, vocab] fp32."""
    return hf_model(torch.tensor([token_ids])).logits[0].float()


@torch.inference_mode()
def hf_greedy(hf_model, token_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation, never stopping at EOS."""
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
    out = hf_model.generate(torch.tensor([token_ids]), attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
                            generation_config=gen)
    new = out[0, len(token_ids):].tolist()
    assert len(new) == max_new_tokens, "transformers stopped early"
    return new


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def random_prompt(length: int, seed: int, vocab_size: int = VOCAB_SIZE) -> list[int]:
    """Random ordinary (non-special) token ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(len(SPECIAL_TOKENS), vocab_size, (length,), generator=g).tolist()


@pytest.fixture(scope="session")
def reference() -> SimpleNamespace:
    """The comparison helpers of this module, for test files (conftest is not imported by name)."""
    return SimpleNamespace(
        hf_full_logits=hf_full_logits, hf_greedy=hf_greedy, load_hf_reference=load_hf_reference,
        build_hf_model=build_hf_model, load_roofline_model=load_roofline_model,
        roofline_full_logits=roofline_full_logits,
        random_prompt=random_prompt, relative_error=relative_error, save_tiny_model=save_tiny_model,
        write_tiny_tokenizer=write_tiny_tokenizer, TinyModelSpec=TinyModelSpec, specs=TINY_MODELS)


def pytest_generate_tests(metafunc) -> None:
    """A test taking `tiny_model_name` runs once per tiny model, grouped by model."""
    if "tiny_model_name" in metafunc.fixturenames:
        metafunc.parametrize("tiny_model_name", list(TINY_MODELS), scope="module")
