"""GGUF metadata checks as pure functions: what a file's tokenizer metadata and tensors must look like.

Messages are one line and name the metadata key or tensor; the caller adds the file's path.
"""

from __future__ import annotations

from roofline.config import ModelConfig
from roofline.errors import ModelLoadError


def describe(value: object) -> str:
    """A metadata value in a few words, for a message (file text is quoted by repr: never a line break)."""
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def check_vocab(meta: dict) -> None:
    """Raise a one-line ModelLoadError unless GGUF tokenizer metadata (keys without the `tokenizer.ggml.`
    prefix) has the types, lengths and in-range token ids that building the tokenizer takes on trust."""
    tokens = meta.get("tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ModelLoadError(f"metadata key tokenizer.ggml.tokens must be an array of strings, got {describe(tokens)}")
    for key in ("model", "pre"):
        if key in meta and not isinstance(meta[key], str):
            raise ModelLoadError(f"metadata key tokenizer.ggml.{key} must be a string, got {describe(meta[key])}")
    for key in ("add_bos_token", "add_space_prefix"):
        if key in meta and not isinstance(meta[key], bool):
            raise ModelLoadError(f"metadata key tokenizer.ggml.{key} must be a boolean, got {describe(meta[key])}")
    for key, kinds in (("token_type", int), ("scores", (int, float))):  # one entry per token
        values = meta.get(key)
        if values is None:
            continue
        if not isinstance(values, list) or any(isinstance(x, bool) or not isinstance(x, kinds) for x in values):
            raise ModelLoadError(f"metadata key tokenizer.ggml.{key} must be an array of numbers, "
                                 f"got {describe(values)}")
        if len(values) != len(tokens):
            raise ModelLoadError(f"metadata key tokenizer.ggml.{key} has {len(values)} entries for "
                                 f"{len(tokens)} tokens")
    merges = meta.get("merges")
    if merges is not None:
        if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
            raise ModelLoadError(f"metadata key tokenizer.ggml.merges must be an array of strings, "
                                 f"got {describe(merges)}")
        bad = next((m for m in merges if " " not in m), None)
        if bad is not None:
            raise ModelLoadError(f"metadata key tokenizer.ggml.merges holds {describe(bad)}, not two tokens "
                                 f"separated by a space")
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id"):
        value = meta.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelLoadError(f"metadata key tokenizer.ggml.{key} must be an integer, got {describe(value)}")
        if not 0 <= value < len(tokens):
            raise ModelLoadError(f"metadata key tokenizer.ggml.{key} is {value}; it must be a token id below "
                                 f"{len(tokens)}, the number of tokens")


def expected_dims(cfg: ModelConfig, has_rope_freqs: bool) -> dict[str, list[int]]:
    """GGUF tensor name -> dims (innermost first, as GGUF lists them) of every tensor a model of `cfg` loads."""
    h, d, v, i = cfg.hidden_size, cfg.head_dim, cfg.vocab_size, cfg.intermediate_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    dims = {"token_embd.weight": [h, v], "output_norm.weight": [h]}
    if not cfg.tie_word_embeddings:
        dims["output.weight"] = [h, v]
    if has_rope_freqs:
        dims["rope_freqs.weight"] = [d // 2]
    for n in range(cfg.num_layers):
        block = {"attn_norm.weight": [h], "ffn_norm.weight": [h], "attn_q.weight": [h, q], "attn_k.weight": [h, kv],
                 "attn_v.weight": [h, kv], "attn_output.weight": [q, h], "ffn_gate.weight": [h, i],
                 "ffn_up.weight": [h, i], "ffn_down.weight": [i, h]}
        if cfg.attention_bias:
            block |= {"attn_q.bias": [q], "attn_k.bias": [kv], "attn_v.bias": [kv], "attn_output.bias": [h]}
        if cfg.qk_norm:
            block |= {"attn_q_norm.weight": [d], "attn_k_norm.weight": [d]}
        dims |= {f"blk.{n}.{name}": shape for name, shape in block.items()}
    return dims
