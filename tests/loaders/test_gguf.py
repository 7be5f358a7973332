"""The GGUF loader: the default model against transformers, tiny converted models of every tensor type
and architecture against their source weights, and damaged files.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from roofline import LLM, SamplingParams
from roofline.loaders import default_model_path, open_model

from loader_errors import expect_load_error

TOL = 1e-4


# ---- the default model (SmolLM2-135M-Instruct Q4_1) against transformers' own GGUF loader ----

@pytest.fixture(scope="module")
def default_pair(reference):
    """(transformers model dequantized from the default GGUF, roofline LLM on the same file)."""
    directory, name = os.path.split(default_model_path())
    hf = reference.load_hf_reference(directory, gguf_file=name)
    llm = LLM(model="default", dtype="float32", device="cpu", kv_cache_memory=64 << 20, max_model_len=512,
              quantization="none")  # fp32 parity; "auto" would serve the file's 4-bit blocks
    return hf, llm


@pytest.fixture(scope="module")
def default_prompts(default_pair) -> list[list[int]]:
    tok = default_pair[1].tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    return [tok.encode(chat, add_special_tokens=False),
            tok.encode("The quick brown fox jumps over the lazy dog. Once upon a time, the")]


def test_default_model_config(default_pair):
    cfg = default_pair[1].engine.model_config
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        "llama", 30, 576, 9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152 and cfg.rope_theta == 100000.0


def test_default_model_logits_match_at_every_position(default_pair, default_prompts, reference):
    hf, llm = default_pair
    for prompt in default_prompts:
        ours = reference.roofline_full_logits(llm.engine.runner.model, prompt)
        ref = reference.hf_full_logits(hf, prompt)
        assert reference.relative_error(ours, ref) <= TOL


def test_default_model_greedy_tokens_and_logprobs_match(default_pair, default_prompts, reference):
    hf, llm = default_pair
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=5)
    outs = llm.generate(default_prompts, params)  # batched: both prompts in one run
    for prompt, out in zip(default_prompts, outs):
        generated = out.outputs[0].token_ids
        assert generated == reference.hf_greedy(hf, prompt, 32)
        ref = torch.log_softmax(reference.hf_full_logits(hf, prompt + generated), dim=-1)[len(prompt) - 1:-1]
        for entry, chosen, row in zip(out.outputs[0].logprobs, generated, ref):
            assert entry[chosen].rank == 1
            assert set(entry) == set(row.topk(5).indices.tolist())
            for token_id, lp in entry.items():
                assert abs(lp.logprob - row[token_id].item()) <= TOL
    assert "Paris" in outs[0].outputs[0].text


# ---- tiny models converted to GGUF the way llama.cpp's converter does ----

_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # llama.cpp writes Mistral as llama
_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _gguf_tensor_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.<module>.<param>
    module, _, param = rest.rpartition(".")
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[module]}.{param}"


def _permute_for_gguf(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for interleaved rope pairs (convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(head_dim: int, theta: float, rope: dict) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for llama3 scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _stored(w: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray]:
    """(array to write, the fp32 values the file then holds) for a 2-D weight of type `qtype`."""
    from gguf import GGMLQuantizationType, quants

    if qtype == GGMLQuantizationType.F32:
        return w, w
    if qtype == GGMLQuantizationType.F16:
        return w.astype(np.float16), w.astype(np.float16).astype(np.float32)
    packed = quants.quantize(w, qtype)
    return packed, quants.dequantize(packed, qtype).reshape(w.shape).astype(np.float32)


def write_gguf(hf_model, path: str, qtype) -> torch.nn.Module:
    """Write `hf_model` as a GGUF file with 2-D weights in `qtype`; returns the model holding the stored values."""
    import gguf

    cfg = hf_model.config
    arch = _GGUF_ARCH[cfg.model_type]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = cfg.rope_parameters
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    tokens = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, cfg.vocab_size)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (cfg.vocab_size - 3))
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    stored_model = copy.deepcopy(hf_model)
    stored_state = {}
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.float().numpy()
        if data.ndim == 2:
            data, stored_state[name] = _stored(data, qtype)
        if arch == "llama" and ".q_proj." in name:
            data = _permute_for_gguf(data, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            data = _permute_for_gguf(data, cfg.num_key_value_heads)
        if data.dtype in (np.float32, np.float16):
            w.add_tensor(_gguf_tensor_name(name), data)
        else:
            w.add_tensor(_gguf_tensor_name(name), data, raw_dtype=qtype)
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(head_dim, rope["rope_theta"], rope))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    stored_model.load_state_dict({k: torch.from_numpy(v) for k, v in stored_state.items()}, strict=False)
    return stored_model


@pytest.mark.parametrize("name, qtype", [
    ("llama-5heads-mqa-tied", "F32"),
    ("llama-mha-bias-linear-rope", "F16"),
    ("llama3-rope-scaling-gqa4", "Q8_0"),
    ("mistral-gqa2-sharded", "BF16"),
    ("qwen2-bias-3heads-mqa-tied", "Q4_0"),
    ("qwen3-qknorm-headdim32", "Q4_1"),
])
def test_converted_tiny_model_logits_match_its_stored_weights(name, qtype, tmp_path, reference):
    from gguf import GGMLQuantizationType

    spec = reference.specs[name]
    hf = reference.build_hf_model(spec)
    path = str(tmp_path / f"{name}.gguf")
    stored = write_gguf(hf, path, GGMLQuantizationType[qtype])
    cfg = open_model(path).model_config()
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.tie_word_embeddings) == (
        hf.config.num_attention_heads, hf.config.num_key_value_heads, hf.config.tie_word_embeddings)
    prompt = reference.random_prompt(60, seed=6)  # past the llama3 model's original 32 positions
    ours = reference.roofline_full_logits(reference.load_roofline_model(path), prompt)
    assert reference.relative_error(ours, reference.hf_full_logits(stored, prompt)) <= TOL


# ---- damaged and unsupported files: one-line ModelLoadError ----

@pytest.mark.parametrize("num_bytes", [1 << 20, 16, 4])
def test_truncated_default_model(tmp_path, num_bytes):
    path = tmp_path / "truncated.gguf"
    with open(default_model_path(), "rb") as f:
        path.write_bytes(f.read(num_bytes))
    expect_load_error(str(path), "truncated.gguf")


def test_gguf_with_tensor_data_cut_short(tmp_path, reference):
    """Header and metadata intact, the last tensor's bytes missing."""
    from gguf import GGMLQuantizationType

    full = tmp_path / "full.gguf"
    write_gguf(reference.build_hf_model(reference.specs["qwen3-qknorm-headdim32"]), str(full),
               GGMLQuantizationType.F32)
    cut = tmp_path / "cut.gguf"
    data = full.read_bytes()
    cut.write_bytes(data[:-1000])
    expect_load_error(str(cut), "cut.gguf: truncated: tensor 'blk.1.ffn_down.weight' ends at byte",
                      f"past the file's {len(data) - 1000} bytes")


def test_gguf_of_an_unsupported_architecture(tmp_path):
    import gguf

    path = str(tmp_path / "gpt2.gguf")
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    message = expect_load_error(path, "'gpt2'", "not supported")
    for supported in ("llama", "mistral", "qwen2", "qwen3"):
        assert supported in message


def test_gguf_with_an_unsupported_tensor_type(tmp_path, reference):
    from gguf import GGMLQuantizationType

    path = str(tmp_path / "q5.gguf")
    write_gguf(reference.build_hf_model(reference.specs["qwen3-qknorm-headdim32"]), path, GGMLQuantizationType.Q5_0)
    expect_load_error(path, "Q5_0", "Q4_K")
