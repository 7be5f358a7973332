"""GGUF loader: metadata -> ModelConfig, tokenizer, chat template, and tensors under HF names."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from roofline.config import ModelConfig
from roofline.errors import ModelLoadError
from roofline.loaders.tokenizer import TextTokenizer, TokenizerInfo, tokenizer_from_gguf_vocab

# GGUF architecture name -> (our registry key, does llama.cpp's converter permute q/k for interleaved rope?)
_ARCHITECTURES = {"llama": ("llama", True), "mistral": ("mistral", True), "qwen2": ("qwen2", False),
                  "qwen3": ("qwen3", False)}
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


@dataclass
class GGMLTensor:
    """A 2-D GGUF tensor kept in its quantized blocks; row n of `blocks` encodes row n of the weight."""

    type_name: str  # GGML type, e.g. "Q4_1"
    shape: tuple[int, int]  # [rows, cols] in HF order
    blocks: torch.Tensor  # [rows, bytes_per_row] uint8

    def dequantize(self) -> torch.Tensor:
        """The fp32 tensor, through gguf's own dequantization."""
        from gguf import GGMLQuantizationType, quants

        array = quants.dequantize(self.blocks.cpu().numpy(), GGMLQuantizationType[self.type_name])
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).reshape(self.shape))


class GGUFFile:
    """One GGUF file, read through a memory map."""

    def __init__(self, path: str) -> None:
        import gguf  # imported here: the module is only needed for GGUF models

        self.path = path
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as exc:  # gguf raises ValueError/IndexError/struct.error on damaged files
            raise ModelLoadError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc}); "
                                 f"is it truncated or corrupt?") from None
        self.metadata = {}
        for key, field in self.reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.metadata[key] = field.contents()
            except Exception as exc:
                raise ModelLoadError(f"{path}: metadata key {key} is unreadable ({exc})") from None

    @cached_property
    def arch(self) -> str:
        """The GGUF `general.architecture`."""
        arch = self.metadata.get("general.architecture")
        if arch not in _ARCHITECTURES:
            raise ModelLoadError(f"{self.path}: architecture {arch!r} is not supported; supported: "
                                 f"{', '.join(sorted(_ARCHITECTURES))}")
        return arch

    def _get(self, key: str, default=None, required: bool = False):
        full = f"{self.arch}.{key}"
        if full not in self.metadata:
            if required:
                raise ModelLoadError(f"{self.path}: metadata key {full} is missing")
            return default
        return self.metadata[full]

    def model_config(self) -> ModelConfig:
        """The architecture hyper-parameters this file describes."""
        hidden = int(self._get("embedding_length", required=True))
        heads = int(self._get("attention.head_count", required=True))
        kv_heads = int(self._get("attention.head_count_kv", heads))
        head_dim = int(self._get("attention.key_length", hidden // heads))
        names = {t.name for t in self.reader.tensors}
        vocab = self._get("vocab_size") or len(self.metadata.get("tokenizer.ggml.tokens", []))
        rope_scaling = None
        if self._get("rope.scaling.type") == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(self._get("rope.scaling.factor", 1.0))}
        if "rope_freqs.weight" in names:  # llama3 scaling: llama.cpp stores the per-frequency divisors
            rope_scaling = {"rope_type": "freq_factors", "factors": self._rope_freq_factors()}
        eos = [self.metadata[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
               if k in self.metadata]
        return ModelConfig(
            architecture=_ARCHITECTURES[self.arch][0],
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(self._get("feed_forward_length", required=True)),
            num_layers=int(self._get("block_count", required=True)),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(self._get("context_length", 2048)),
            rms_norm_eps=float(self._get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(self._get("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            qk_norm="blk.0.attn_q_norm.weight" in names,
            bos_token_id=self.metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=sorted(set(int(e) for e in eos)),
        )

    def _rope_freq_factors(self) -> list[float]:
        from gguf import GGMLQuantizationType, quants

        t = next(t for t in self.reader.tensors if t.name == "rope_freqs.weight")
        try:
            return [float(x) for x in quants.dequantize(t.data, GGMLQuantizationType(t.tensor_type)).reshape(-1)]
        except Exception as exc:
            raise ModelLoadError(f"{self.path}: tensor rope_freqs.weight is unreadable ({exc})") from None

    def tokenizer(self) -> TextTokenizer:
        """The model's tokenizer, rebuilt from the vocabulary metadata."""
        prefix = "tokenizer.ggml."
        meta = {k[len(prefix):]: v for k, v in self.metadata.items() if k.startswith(prefix)}
        if "tokens" not in meta:
            raise ModelLoadError(f"{self.path}: the file has no tokenizer vocabulary")
        tokens = meta["tokens"]
        bos, eos = meta.get("bos_token_id"), meta.get("eos_token_id")
        is_spm = meta.get("model") == "llama"
        info = TokenizerInfo(
            bos_token_id=bos,
            eos_token_ids=self.model_config().eos_token_ids,
            add_bos_token=bool(meta.get("add_bos_token", is_spm)),
            chat_template=self.metadata.get("tokenizer.chat_template"),
            bos_token=tokens[bos] if bos is not None else None,
            eos_token=tokens[eos] if eos is not None else None,
        )
        return TextTokenizer(tokenizer_from_gguf_vocab(meta), info)

    def num_tensors(self) -> int:
        """How many tensors the file holds."""
        return len(self.reader.tensors)

    def tensor_types(self) -> dict[str, str]:
        """HF-style tensor name -> GGML type name ("F32", "Q4_1", ...)."""
        from gguf import GGMLQuantizationType

        return {name: GGMLQuantizationType(t.tensor_type).name for t in self.reader.tensors
                if (name := _hf_name(t.name)) is not None}

    def tensors(self, dtype: torch.dtype, keep_quantized: Collection[str] = ()
                ) -> Iterator[tuple[str, torch.Tensor | GGMLTensor]]:
        """Yield (HF-style name, tensor) pairs, dequantized to `dtype`; 2-D tensors named in
        `keep_quantized` come as their raw blocks (GGMLTensor) for the quantized layers to decode."""
        from gguf import GGMLQuantizationType, quants

        cfg = self.model_config()
        permuted = _ARCHITECTURES[self.arch][1]
        for t in self.reader.tensors:
            name = _hf_name(t.name)
            if name is None:
                continue
            qtype = GGMLQuantizationType(t.tensor_type)
            if qtype.name not in SUPPORTED_TENSOR_TYPES:
                raise ModelLoadError(f"{self.path}: tensor {t.name} has type {qtype.name}; supported: "
                                     f"{', '.join(SUPPORTED_TENSOR_TYPES)}")
            shape = tuple(int(d) for d in reversed(t.shape))  # gguf lists dims innermost first
            if name in keep_quantized and len(shape) == 2 and t.data.dtype == np.uint8:
                blocks = torch.from_numpy(np.array(t.data, dtype=np.uint8))  # [rows, bytes per row]
                if permuted and name.endswith(("q_proj.weight", "k_proj.weight")):  # rows permute whole
                    blocks = _unpermute_rope(blocks, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)
                yield name, GGMLTensor(qtype.name, shape, blocks)
                continue
            try:
                array = np.asarray(quants.dequantize(t.data, qtype), dtype=np.float32).reshape(shape)
            except Exception as exc:
                raise ModelLoadError(f"{self.path}: tensor {t.name} is unreadable ({exc}); "
                                     f"is the file truncated?") from None
            tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
            if permuted and name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
                heads = cfg.num_heads if "q_proj" in name else cfg.num_kv_heads
                tensor = _unpermute_rope(tensor, heads)
            yield name, tensor.to(dtype)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        return None  # e.g. rope_freqs: recomputed from the config
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def _unpermute_rope(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved rope pairs -> rotate-half halves)."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)
