"""Maps a ModelConfig's architecture to the class that implements it."""

from __future__ import annotations

from torch import nn

from roofline.config import ModelConfig
from roofline.errors import ModelLoadError
from roofline.models.llama import LlamaForCausalLM

# Mistral, Qwen2 and Qwen3 are Llama-shaped; their differences (qkv bias, q/k norm) are config flags.
_MODELS: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
}


def supported_architectures() -> list[str]:
    """Registry keys of the supported architectures."""
    return sorted(_MODELS)


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    """The model class for `cfg.architecture`."""
    if cfg.architecture not in _MODELS:
        raise ModelLoadError(f"architecture {cfg.architecture!r} is not supported; "
                             f"supported: {', '.join(supported_architectures())}")
    return _MODELS[cfg.architecture]
