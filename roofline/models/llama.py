"""The Llama family decoder (Llama 2/3, SmolLM, TinyLlama), which Mistral, Qwen2 and Qwen3 extend.

Built only from `roofline.layers`. Differences between the families are config flags that select
layers: q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3), rope scaling (Llama 3.1).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from roofline.config import ModelConfig
from roofline.errors import ModelLoadError
from roofline.layers.attention import AttentionMetadata, PagedAttention
from roofline.layers.embedding import LMHead, VocabEmbedding
from roofline.layers.linear import Linear
from roofline.layers.norm import RMSNorm
from roofline.layers.rotary import RotaryEmbedding, apply_rotary

KVCache = tuple[torch.Tensor, torch.Tensor]
Rope = tuple[torch.Tensor, torch.Tensor]  # the step's (cos, sin) [T, 1, head_dim], gathered once per step


class LlamaAttention(nn.Module):
    """Self-attention with fused q/k/v projection, rotary embeddings and paged KV."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, [q_size, kv_size, kv_size], bias=cfg.attention_bias)
        # attention_bias puts a bias on o_proj too, except in Qwen2, whose flag covers q/k/v only
        self.o_proj = Linear(q_size, [cfg.hidden_size], bias=cfg.attention_bias and cfg.architecture != "qwen2")
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.attn = PagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)

    def forward(self, x: torch.Tensor, rope: Rope, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        T, H, D = x.shape[0], self.num_heads, self.head_dim
        qkv = self.qkv_proj(x)  # [T, (H + 2 KVH) * D]
        v = qkv[:, (H + self.num_kv_heads) * D:].view(T, self.num_kv_heads, D)
        if self.q_norm is None:  # q and k rotated together: one set of ops for both
            qk = apply_rotary(qkv[:, :(H + self.num_kv_heads) * D].view(T, H + self.num_kv_heads, D), rope)
            q, k = qk[:, :H], qk[:, H:]
        else:  # per-head norms first (Qwen3), each with its own weight
            q = apply_rotary(self.q_norm(qkv[:, :H * D].view(T, H, D)), rope)
            k = apply_rotary(self.k_norm(qkv[:, H * D:(H + self.num_kv_heads) * D].view(T, self.num_kv_heads, D)), rope)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward with fused gate/up projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, [cfg.intermediate_size] * 2)
        self.down_proj = Linear(cfg.intermediate_size, [cfg.hidden_size])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with residual connections."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: torch.Tensor, rope: Rope, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Causal LM over flat token batches: forward gives hidden states, compute_logits the fp32 logits."""

    # checkpoint module name -> (our packed module name, shard index)
    packed_modules = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size,
                              tied_to=self.model.embed_tokens if cfg.tie_word_embeddings else None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions [T] -> hidden [T, hidden]
        x = self.model.embed_tokens(input_ids)
        rope = self.model.rotary.gather(positions, x.dtype)
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x = layer(x, rope, kv_cache, meta)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] fp32."""
        return self.lm_head(hidden)

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (HF names) into the model; every parameter must be filled exactly once."""
        modules = dict(self.named_modules())
        params = dict(self.named_parameters())
        missing = set(params)
        if self.config.tie_word_embeddings:
            missing.discard("lm_head.weight")
        for name, tensor in tensors:
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            module_path, _, param_name = name.rpartition(".")
            parent, _, leaf = module_path.rpartition(".")
            shard = 0
            if leaf in self.packed_modules:
                leaf, shard = self.packed_modules[leaf]
                module_path = f"{parent}.{leaf}"
            module = modules.get(module_path)
            if module is None or not hasattr(module, param_name):
                raise ModelLoadError(f"checkpoint tensor {name} does not belong to this architecture")
            try:
                if isinstance(module, Linear):
                    module.load(param_name, tensor, shard)
                else:
                    target = getattr(module, param_name).data
                    if target.shape != tensor.shape:
                        raise ValueError(f"checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}")
                    target.copy_(tensor)
            except ValueError as exc:
                raise ModelLoadError(f"checkpoint tensor {name}: {exc}") from None
            missing.discard(f"{module_path}.{param_name}")
        if missing:
            raise ModelLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
