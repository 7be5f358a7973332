"""Fixtures for the data-parallel and Ray tests: a tiny random model on disk that child processes can load."""

from __future__ import annotations

import json
import os

import pytest

# Ray reads these when it is imported: single-machine mode, so a local Ray binds and talks on loopback only
# (never the machine's own interface address), and no usage report
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# replicas report their load every 0.5 s (Ray's default: 10 s), so the scale-to-zero test waits seconds
os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")


def save_random_llama(path: str, write_tokenizer) -> None:
    """A 2-layer Llama with random weights, written directly (no transformers import: seconds saved)."""
    import numpy as np
    from safetensors.numpy import save_file

    hidden, inter, vocab, kv = 80, 160, 512, 16
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": 2, "num_attention_heads": 5, "num_key_value_heads": 1,
              "head_dim": 16, "vocab_size": vocab, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
              "rope_theta": 100000.0, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
              "hidden_act": "silu", "torch_dtype": "float32"}
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(2):
        layer = f"model.layers.{i}."
        shapes.update({layer + "input_layernorm.weight": (hidden,), layer + "post_attention_layernorm.weight": (hidden,),
                       layer + "mlp.gate_proj.weight": (inter, hidden), layer + "mlp.up_proj.weight": (inter, hidden),
                       layer + "mlp.down_proj.weight": (hidden, inter), layer + "self_attn.q_proj.weight": (hidden, hidden),
                       layer + "self_attn.k_proj.weight": (kv, hidden), layer + "self_attn.v_proj.weight": (kv, hidden),
                       layer + "self_attn.o_proj.weight": (hidden, hidden)})
    rng = np.random.default_rng(0)
    tensors = {name: (1.0 + 0.2 * rng.standard_normal(shape) if name.endswith("norm.weight")
                      else 0.15 * rng.standard_normal(shape)).astype(np.float32) for name, shape in shapes.items()}
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    write_tokenizer(path)


@pytest.fixture(scope="session")
def random_llama_dir(tmp_path_factory, reference) -> str:
    """The random 2-layer Llama saved once per session: its directory."""
    path = str(tmp_path_factory.mktemp("random-llama"))
    save_random_llama(path, reference.write_tiny_tokenizer)
    return path
