"""ModelSpec: a decoder-only transformer's shapes reduced to parameter counts, bytes and FLOPs."""

from __future__ import annotations

import math
from dataclasses import dataclass

from roofline.config import ModelConfig
from roofline.errors import ConfigError
from roofline.planner.formats import WeightFormat

# Multiply-accumulate = 2 FLOPs; QK^T and AV each cost one MAC per (head, head_dim, attended token).
FLOPS_PER_MAC = 2
ATTENTION_MATMULS = 2
KV_TENSORS = 2  # one K and one V per layer


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a decoder-only transformer, enough to count its parameters, bytes and FLOPs."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when < num_heads)
    head_dim: int
    max_context: int  # longest sequence the model supports
    tie_word_embeddings: bool = False  # LM head reuses the embedding table
    is_gated_mlp: bool = True  # SwiGLU gate+up+down (3 matrices); else up+down (2, e.g. OPT)
    has_linear_bias: bool = False  # a bias on every linear layer (OPT)
    has_qkv_bias: bool = False  # a bias on q/k/v only (Qwen2)
    has_qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    norm_has_bias: bool = False  # LayerNorm (weight and bias) rather than RMSNorm
    num_learned_positions: int = 0  # rows of a learned position table (OPT); 0 with rotary
    native_format: WeightFormat | None = None  # what the checkpoint stores, when known

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_context"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model spec {self.name}: {name} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model spec {self.name}: num_heads is not a multiple of num_kv_heads")

    # ---- parameter counts (one layer, unsharded) ----
    @property
    def attention_matrix_params(self) -> int:
        """Weights of q, k, v, o in one layer."""
        h, d = self.hidden_size, self.head_dim
        return h * d * (2 * self.num_heads + 2 * self.num_kv_heads)

    @property
    def mlp_matrix_params(self) -> int:
        """Weights of the MLP matrices in one layer."""
        num_matrices = 3 if self.is_gated_mlp else 2
        return num_matrices * self.hidden_size * self.intermediate_size

    @property
    def layer_matrix_params(self) -> int:
        """Matmul weights in one layer (what a decode step multiplies by)."""
        return self.attention_matrix_params + self.mlp_matrix_params

    @property
    def layer_vector_params(self) -> int:
        """Biases and norm weights in one layer."""
        h, d = self.hidden_size, self.head_dim
        qkv_out = d * (self.num_heads + 2 * self.num_kv_heads)
        bias = 0
        if self.has_linear_bias:
            mlp_out = self.intermediate_size * (2 if self.is_gated_mlp else 1)
            bias = qkv_out + h + mlp_out + h
        elif self.has_qkv_bias:
            bias = qkv_out
        norms = 2 * h * (2 if self.norm_has_bias else 1)
        return bias + norms + (2 * d if self.has_qk_norm else 0)

    @property
    def layer_params(self) -> int:
        """All parameters of one transformer block."""
        return self.layer_matrix_params + self.layer_vector_params

    @property
    def embedding_params(self) -> int:
        """Token table plus any learned position table."""
        return (self.vocab_size + self.num_learned_positions) * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Output projection weights stored separately from the embedding (0 when tied)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def final_norm_params(self) -> int:
        """The norm before the LM head."""
        return self.hidden_size * (2 if self.norm_has_bias else 1)

    @property
    def num_params(self) -> int:
        """Total parameters, a tied embedding counted once."""
        return (self.num_layers * self.layer_params + self.embedding_params
                + self.lm_head_params + self.final_norm_params)

    # ---- bytes ----
    def weight_bytes(self, fmt: WeightFormat) -> float:
        """Bytes of all weights stored in the given format."""
        return self.num_params * fmt.bytes_per_weight

    def decode_read_params(self) -> int:
        """Parameters a decode step reads in full: every layer, the final norm and the LM head."""
        # The embedding table is only gathered row by row, except when it doubles as the LM head.
        head = self.vocab_size * self.hidden_size
        return self.num_layers * self.layer_params + self.final_norm_params + head

    def kv_bytes_per_token(self, kv_bytes_per_element: float) -> float:
        """KV cache bytes one token occupies across all layers."""
        return KV_TENSORS * self.num_layers * self.num_kv_heads * self.head_dim * kv_bytes_per_element

    # ---- FLOPs ----
    @property
    def matmul_flops_per_token(self) -> int:
        """Weight-matmul FLOPs for one token through all layers (LM head excluded)."""
        return FLOPS_PER_MAC * self.num_layers * self.layer_matrix_params

    @property
    def lm_head_flops(self) -> int:
        """FLOPs of the LM head for one token."""
        return FLOPS_PER_MAC * self.vocab_size * self.hidden_size

    def attention_flops(self, num_attended: float) -> float:
        """Score and weighted-sum FLOPs for one query token attending to num_attended tokens."""
        return (ATTENTION_MATMULS * FLOPS_PER_MAC * self.num_layers * self.num_heads
                * self.head_dim * num_attended)

    def decode_flops_per_token(self, context: float) -> float:
        """FLOPs to produce one token at the given context length (tokens attended)."""
        return self.matmul_flops_per_token + self.lm_head_flops + self.attention_flops(context)

    def prefill_flops(self, prompt_len: int) -> float:
        """FLOPs to prefill one prompt: causal attention over 1..prompt_len, LM head on the last token only."""
        causal_pairs = prompt_len * (prompt_len + 1) / 2
        return (self.matmul_flops_per_token * prompt_len + self.lm_head_flops
                + self.attention_flops(causal_pairs))

    # ---- tensor-parallel shards ----
    def kv_heads_per_rank(self, tp: int) -> int:
        """KV heads each tensor-parallel rank holds (replicated when tp exceeds them)."""
        return math.ceil(self.num_kv_heads / tp)

    def layer_params_per_rank(self, tp: int) -> float:
        """Parameters of one layer on one tensor-parallel rank."""
        h, d = self.hidden_size, self.head_dim
        attention = h * d * (2 * self.num_heads / tp + 2 * self.kv_heads_per_rank(tp))
        return attention + self.mlp_matrix_params / tp + self.layer_vector_params

    def supports_tp(self, tp: int) -> bool:
        """Whether heads and MLP split evenly over tp ranks."""
        kv_ok = self.num_kv_heads % tp == 0 or tp % self.num_kv_heads == 0
        return self.num_heads % tp == 0 and kv_ok and self.intermediate_size % tp == 0


def spec_from_config(config: ModelConfig, name: str = "model",
                     native_format: WeightFormat | None = None) -> ModelSpec:
    """Build a ModelSpec from a runtime ModelConfig (Llama-family: SwiGLU, RMSNorm, rotary)."""
    return ModelSpec(
        name=name, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_layers=config.num_layers,
        num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
        max_context=config.max_position_embeddings, tie_word_embeddings=config.tie_word_embeddings,
        has_qkv_bias=config.attention_bias, has_qk_norm=config.qk_norm, native_format=native_format)
