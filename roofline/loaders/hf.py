"""Hugging Face directory loader: config.json, safetensors (single or sharded), tokenizer, chat template."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch

from roofline.config import ModelConfig
from roofline.errors import ModelLoadError
from roofline.loaders.tokenizer import TextTokenizer, TokenizerInfo

# HF `architectures[0]` -> our registry key
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


class HFDirectory:
    """A model directory in the Hugging Face layout; tensors are memory-mapped, never unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.config = self._read_json("config.json", required=True)

    def _read_json(self, name: str, required: bool = False) -> dict:
        file = os.path.join(self.path, name)
        if not os.path.exists(file):
            if required:
                raise ModelLoadError(f"{self.path}: no {name}; is this a Hugging Face model directory?")
            return {}
        try:
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{file}: unreadable JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ModelLoadError(f"{file}: expected a JSON object, got a JSON {type(data).__name__}")
        return data

    def model_config(self) -> ModelConfig:
        """The architecture hyper-parameters from config.json."""
        c = self.config
        archs = c.get("architectures") or []
        arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(f"{self.path}: architecture {archs or c.get('model_type')} is not supported; "
                                 f"supported: {', '.join(sorted(HF_ARCHITECTURES))}")
        try:
            heads = _int_field(c, "num_attention_heads")
            hidden = _int_field(c, "hidden_size")
            head_dim = _int_field(c, "head_dim") if c.get("head_dim") else hidden // max(heads, 1)
            gen = self._read_json("generation_config.json")
            eos = [e for src in (c.get("eos_token_id"), gen.get("eos_token_id")) if src is not None
                   for e in (src if isinstance(src, list) else [src])]
            # transformers >= 5 writes rope settings under `rope_parameters`; older files use top-level keys
            rope = c.get("rope_parameters") or {}
            rope_theta = c.get("rope_theta") or rope.get("rope_theta", 10000.0)
            scaling = c.get("rope_scaling")
            if scaling is None and rope.get("rope_type", "default") != "default":
                scaling = rope
            if c.get("mlp_bias"):
                raise ModelLoadError(f"{self.path}: mlp_bias=true is not supported")
            max_positions = _int_field(c, "max_position_embeddings") if "max_position_embeddings" in c else 2048
            window = _sliding_window(c, arch)
            if window is not None:  # no sliding-window attention: stay within the window, where it is exact
                max_positions = min(max_positions, window)
            return ModelConfig(
                architecture=arch,
                vocab_size=_int_field(c, "vocab_size"),
                hidden_size=hidden,
                intermediate_size=_int_field(c, "intermediate_size"),
                num_layers=_int_field(c, "num_hidden_layers"),
                num_heads=heads,
                num_kv_heads=_int_field(c, "num_key_value_heads") if c.get("num_key_value_heads") else heads,
                head_dim=int(head_dim),
                max_position_embeddings=max_positions,
                rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta),
                rope_scaling=scaling,
                tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
                attention_bias=bool(c.get("attention_bias", arch == "qwen2")),
                qk_norm=arch == "qwen3",
                bos_token_id=c.get("bos_token_id"),
                eos_token_ids=sorted(set(int(e) for e in eos)),
                hidden_act=c.get("hidden_act", "silu"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{self.path}/config.json: missing or bad field {exc}") from None

    def tokenizer(self) -> TextTokenizer:
        """The tokenizer from tokenizer.json, with specials and chat template from tokenizer_config.json."""
        from tokenizers import Tokenizer

        file = os.path.join(self.path, "tokenizer.json")
        if not os.path.exists(file):
            raise ModelLoadError(f"{self.path}: no tokenizer.json (the fast-tokenizer file is required)")
        try:
            tok = Tokenizer.from_file(file)
        except Exception as exc:
            raise ModelLoadError(f"{file}: unreadable tokenizer ({exc})") from None
        tc = self._read_json("tokenizer_config.json")
        template = tc.get("chat_template")
        template_file = os.path.join(self.path, "chat_template.jinja")
        if os.path.exists(template_file):
            with open(template_file, encoding="utf-8") as f:
                template = f.read()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        bos_tok, eos_tok = _token_text(tc.get("bos_token")), _token_text(tc.get("eos_token"))
        cfg = self.model_config()
        bos_id = tok.token_to_id(bos_tok) if bos_tok else cfg.bos_token_id
        eos_ids = list(cfg.eos_token_ids)
        if eos_tok and tok.token_to_id(eos_tok) is not None and tok.token_to_id(eos_tok) not in eos_ids:
            eos_ids.append(tok.token_to_id(eos_tok))
        # tokenizer.json's post-processor adds BOS where the model wants it; add_bos_token covers the rest.
        has_post = tok.post_processor is not None
        info = TokenizerInfo(bos_token_id=bos_id, eos_token_ids=eos_ids,
                             add_bos_token=bool(tc.get("add_bos_token", False)) and not has_post,
                             chat_template=template, bos_token=bos_tok, eos_token=eos_tok)
        return TextTokenizer(tok, info)

    def _weight_files(self) -> list[str]:
        index = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.exists(index):
            weight_map = self._read_json("model.safetensors.index.json").get("weight_map", {})
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
        if not files:
            raise ModelLoadError(f"{self.path}: no *.safetensors weights (pickled .bin files are not loaded)")
        return [os.path.join(self.path, f) for f in files]

    def num_tensors(self) -> int:
        """How many tensors the checkpoint holds."""
        from safetensors import safe_open

        total = 0
        for file in self._weight_files():
            try:
                with safe_open(file, framework="pt") as f:
                    total += len(list(f.keys()))
            except Exception as exc:
                raise ModelLoadError(f"{file}: unreadable safetensors ({exc}); is it truncated?") from None
        return total

    def tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) pairs from the safetensors files, cast to `dtype`."""
        from safetensors import safe_open

        for file in self._weight_files():
            if not os.path.exists(file):
                raise ModelLoadError(f"{file}: weight shard listed in the index is missing")
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name).to(dtype)
            except ModelLoadError:
                raise
            except Exception as exc:
                raise ModelLoadError(f"{file}: unreadable safetensors ({exc}); is it truncated?") from None


def _sliding_window(c: dict, arch: str) -> int | None:
    """The attention window of config.json when any layer uses one, else None."""
    window = c.get("sliding_window")
    if not window:
        return None
    if arch == "mistral":  # Mistral applies its window to every layer whenever one is set
        return int(window)
    if not c.get("use_sliding_window", False):  # Qwen2/3 apply it only when switched on, and per layer
        return None
    layer_types = c.get("layer_types")
    if layer_types is not None:
        return int(window) if "sliding_attention" in layer_types else None
    return int(window) if int(c.get("max_window_layers", 0)) < int(c["num_hidden_layers"]) else None


def _token_text(tok: str | dict | None) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _int_field(c: dict, key: str) -> int:
    """An integer hyper-parameter: ints, or floats with an integral value (1e3); bools and 1.5 are rejected."""
    value = c[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    return int(value)
