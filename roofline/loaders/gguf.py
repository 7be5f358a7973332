"""GGUF loader: metadata -> ModelConfig, tokenizer, chat template, and tensors under HF names."""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from roofline.config import ModelConfig
from roofline.errors import ConfigError, ModelLoadError, first_line
from roofline.loaders.gguf_checks import check_vocab, describe, expected_dims
from roofline.loaders.gguf_reader import read_gguf
from roofline.loaders.tokenizer import TextTokenizer, TokenizerInfo, tokenizer_from_gguf_vocab

# GGUF architecture name -> (our registry key, does llama.cpp's converter permute q/k for interleaved rope?)
_ARCHITECTURES = {"llama": ("llama", True), "mistral": ("mistral", True), "qwen2": ("qwen2", False),
                  "qwen3": ("qwen3", False)}
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
# 16M positions: above any released model's context (10M); a larger value is a corrupt field, and the
# rotary table for it alone would take GiBs
MAX_CONTEXT_LENGTH = 1 << 24

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
        self.path = path
        try:  # every length, count and offset is proved to fit the file as it is read
            self.reader = read_gguf(path)
        except ModelLoadError:
            raise
        except Exception as exc:  # damage the layout walk does not look for still gets one line
            raise self._error(f"not a readable GGUF file ({type(exc).__name__}: {first_line(exc)}); "
                              f"is it truncated or corrupt?") from None
        self.metadata = self.reader.metadata
        self._config: ModelConfig | None = None  # model_config(), once read

    def _error(self, message: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {message}")

    @cached_property
    def arch(self) -> str:
        """The GGUF `general.architecture`."""
        arch = self.metadata.get("general.architecture")
        if arch is None:
            raise self._error("metadata key general.architecture is missing")
        if not isinstance(arch, str) or arch not in _ARCHITECTURES:
            raise self._error(f"architecture {arch!r} is not supported; supported: {', '.join(sorted(_ARCHITECTURES))}")
        return arch

    def _int(self, key: str, default: int | None = None, minimum: int = 1, maximum: int | None = None) -> int:
        """An integer metadata value (no bools, floats or arrays) in [minimum, maximum]; missing and no
        default: an error."""
        if key not in self.metadata:
            if default is None:
                raise self._error(f"metadata key {key} is missing")
            return default
        value = self.metadata[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._error(f"metadata key {key} must be an integer, got {describe(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise self._error(f"metadata key {key} is {value}; it must be {bound}")
        return value

    def _float(self, key: str, default: float, minimum: float = 0.0) -> float:
        """A finite number of at least `minimum` (ints accepted), or `default` when the key is missing."""
        value = self.metadata.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < minimum:
            raise self._error(f"metadata key {key} must be a finite number of at least {minimum}, "
                              f"got {describe(value)}")
        return float(value)

    def _token_id(self, key: str, vocab_size: int) -> int | None:
        value = self.metadata.get(key)
        if value is None:
            return None
        return self._int(key, minimum=0, maximum=vocab_size - 1)

    def _num_tokens(self) -> int | None:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if tokens is None:
            return None
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise self._error(f"metadata key tokenizer.ggml.tokens must be an array of strings, "
                              f"got {describe(tokens)}")
        return len(tokens)

    def model_config(self) -> ModelConfig:
        """The architecture hyper-parameters this file describes, checked against its tensors' shapes."""
        # read and checked once (the vocabulary check alone walks every token): the engine, the runner,
        # the tokenizer and tensors() each ask; each caller gets its own copy to change
        if self._config is None:
            self._config = self._read_model_config()
        return copy.deepcopy(self._config)

    def _read_model_config(self) -> ModelConfig:
        a = f"{self.arch}."
        hidden = self._int(a + "embedding_length")
        heads = self._int(a + "attention.head_count")
        kv_heads = self._int(a + "attention.head_count_kv", heads)
        head_dim = self._int(a + "attention.key_length", max(hidden // heads, 1))
        if heads % kv_heads:
            raise self._error(f"{a}attention.head_count ({heads}) is not a multiple of "
                              f"{a}attention.head_count_kv ({kv_heads})")
        if head_dim % 2:
            raise self._error(f"the head size is {head_dim} ({a}attention.key_length, or embedding_length / "
                              f"head_count); rotary embeddings need an even one")
        num_tokens = self._num_tokens()
        if a + "vocab_size" not in self.metadata and num_tokens is None:
            raise self._error(f"neither {a}vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
        vocab = self._int(a + "vocab_size", num_tokens)
        if num_tokens is not None and num_tokens > vocab:
            raise self._error(f"tokenizer.ggml.tokens holds {num_tokens} tokens, more than {a}vocab_size ({vocab})")
        names = {t.name for t in self.reader.tensors}
        rope_scaling = None
        scaling_type = self.metadata.get(a + "rope.scaling.type")
        if scaling_type is not None and not isinstance(scaling_type, str):
            raise self._error(f"metadata key {a}rope.scaling.type must be a string, got {describe(scaling_type)}")
        if scaling_type == "linear":
            rope_scaling = {"rope_type": "linear", "factor": self._float(a + "rope.scaling.factor", 1.0, 1e-6)}
        eos = [self._token_id(k, vocab) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
        try:
            cfg = ModelConfig(
                architecture=_ARCHITECTURES[self.arch][0],
                vocab_size=vocab,
                hidden_size=hidden,
                intermediate_size=self._int(a + "feed_forward_length"),
                num_layers=self._int(a + "block_count"),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                max_position_embeddings=self._int(a + "context_length", 2048, maximum=MAX_CONTEXT_LENGTH),
                rms_norm_eps=self._float(a + "attention.layer_norm_rms_epsilon", 1e-6),
                rope_theta=self._float(a + "rope.freq_base", 10000.0, 1e-6),
                rope_scaling=rope_scaling,
                tie_word_embeddings="output.weight" not in names,
                attention_bias="blk.0.attn_q.bias" in names,
                qk_norm="blk.0.attn_q_norm.weight" in names,
                bos_token_id=self._token_id("tokenizer.ggml.bos_token_id", vocab),
                eos_token_ids=sorted({e for e in eos if e is not None}),
            )
        except ConfigError as exc:
            raise self._error(str(exc)) from None
        self._check_tensors(cfg, "rope_freqs.weight" in names)
        if "rope_freqs.weight" in names:  # llama3 scaling: llama.cpp stores the per-frequency divisors
            cfg.rope_scaling = {"rope_type": "freq_factors", "factors": self._rope_freq_factors()}
        return cfg

    def _check_tensors(self, cfg: ModelConfig, has_rope_freqs: bool) -> None:
        """Every tensor the model loads is present, of a supported type and of the shape the metadata
        implies; checked before anything is allocated, so the config's sizes are bounded by the file's."""
        blocks = {int(m.group(1)) for t in self.reader.tensors if (m := _BLOCK_RE.match(t.name))}
        if cfg.num_layers != len(blocks):
            raise self._error(f"{self.arch}.block_count is {cfg.num_layers}, but the file holds tensors of "
                              f"{len(blocks)} blocks")
        expected = expected_dims(cfg, has_rope_freqs)
        for t in self.reader.tensors:
            if _hf_name(t.name) is None and t.name != "rope_freqs.weight":
                continue  # not loaded
            dims = expected.pop(t.name, None)
            if dims is None:
                raise self._error(f"tensor {t.name!r} does not belong in a {cfg.num_layers}-block {self.arch} "
                                  f"model with these settings")
            actual = list(t.shape)
            if actual != dims:
                raise self._error(f"tensor {t.name!r} has shape {actual}, but the metadata implies {dims}")
            type_name = t.tensor_type.name
            if type_name not in SUPPORTED_TENSOR_TYPES:
                raise self._error(f"tensor {t.name!r} has type {type_name}; supported: "
                                  f"{', '.join(SUPPORTED_TENSOR_TYPES)}")
        # o_proj's bias comes with attention_bias in some families only (not Qwen2): the model's
        # load_weights tells a missing one from an unwanted one
        missing = sorted(name for name in expected if not name.endswith("attn_output.bias"))
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise self._error(f"tensor {missing[0]!r} is missing{more}")

    def _rope_freq_factors(self) -> list[float]:
        from gguf import quants

        t = next(t for t in self.reader.tensors if t.name == "rope_freqs.weight")
        try:
            return [float(x) for x in quants.dequantize(t.data, t.tensor_type).reshape(-1)]
        except Exception as exc:
            raise self._error(f"tensor rope_freqs.weight is unreadable ({first_line(exc)})") from None

    def tokenizer(self) -> TextTokenizer:
        """The model's tokenizer, rebuilt from the vocabulary metadata."""
        prefix = "tokenizer.ggml."
        meta = {k[len(prefix):]: v for k, v in self.metadata.items() if k.startswith(prefix)}
        if "tokens" not in meta:
            raise self._error("the file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
        template = self.metadata.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise self._error(f"metadata key tokenizer.chat_template must be a string, got {describe(template)}")
        eos_token_ids = self.model_config().eos_token_ids
        try:
            check_vocab(meta)
            tokens = meta["tokens"]
            bos, eos = meta.get("bos_token_id"), meta.get("eos_token_id")
            is_spm = meta.get("model") == "llama"
            info = TokenizerInfo(
                bos_token_id=bos,
                eos_token_ids=eos_token_ids,
                add_bos_token=meta.get("add_bos_token", is_spm),
                chat_template=template,
                bos_token=tokens[bos] if bos is not None else None,
                eos_token=tokens[eos] if eos is not None else None,
            )
            return TextTokenizer(tokenizer_from_gguf_vocab(meta), info)
        except ModelLoadError as exc:  # messages of the checks and the tokenizer module, told which file
            raise self._error(str(exc)) from None

    def num_tensors(self) -> int:
        """How many tensors the file holds."""
        return len(self.reader.tensors)

    def tensor_types(self) -> dict[str, str]:
        """HF-style tensor name -> GGML type name ("F32", "Q4_1", ...)."""
        return {name: t.tensor_type.name for t in self.reader.tensors
                if (name := _hf_name(t.name)) is not None}

    def tensors(self, dtype: torch.dtype, keep_quantized: Collection[str] = ()
                ) -> Iterator[tuple[str, torch.Tensor | GGMLTensor]]:
        """Yield (HF-style name, tensor) pairs, dequantized to `dtype`; 2-D tensors named in
        `keep_quantized` come as their raw blocks (GGMLTensor) for the quantized layers to decode."""
        from gguf import quants

        cfg = self.model_config()
        permuted = _ARCHITECTURES[self.arch][1]
        for t in self.reader.tensors:
            name = _hf_name(t.name)
            if name is None:
                continue
            qtype = t.tensor_type  # supported: model_config() checked every type
            shape = tuple(reversed(t.shape))  # gguf lists dims innermost first
            if name in keep_quantized and len(shape) == 2 and t.data.dtype == np.uint8:
                blocks = _mapped(t.data)  # [rows, bytes per row], read from the file as the layer decodes it
                if permuted and name.endswith(("q_proj.weight", "k_proj.weight")):  # rows permute whole
                    blocks = _unpermute_rope(blocks, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)
                yield name, GGMLTensor(qtype.name, shape, blocks)
                continue
            try:
                array = np.asarray(quants.dequantize(t.data, qtype), dtype=np.float32).reshape(shape)
            except Exception as exc:
                raise self._error(f"tensor {t.name!r} is unreadable ({first_line(exc)}); "
                                  f"is the file truncated?") from None
            tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
            if permuted and name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
                heads = cfg.num_heads if "q_proj" in name else cfg.num_kv_heads
                tensor = _unpermute_rope(tensor, heads)
            yield name, tensor.to(dtype)


def _mapped(data: np.ndarray) -> torch.Tensor:
    """A uint8 tensor over the file's read-only memory map, not a copy (the quantized layers decode
    straight from it; nothing writes to it: a write would fault)."""
    with warnings.catch_warnings():  # torch warns that the array is not writable: by design here
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(data)


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
