"""Resolve the MODEL argument of `roofline plan` (a preset, "default", an HF directory or a .gguf) to a ModelSpec."""

from __future__ import annotations

from pathlib import Path

from roofline.errors import ModelLoadError
from roofline.planner.formats import WeightFormat, get_weight_format, gguf_runtime_kernel, mixed_format
from roofline.planner.model_presets import model_presets
from roofline.planner.model_spec import ModelSpec, spec_from_config

HF_TORCH_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def load_model_spec(model: str) -> ModelSpec:
    """A preset name, "default", a Hugging Face model directory or a .gguf file, as a ModelSpec."""
    presets = model_presets()
    if model.lower() in presets:
        return presets[model.lower()]
    if model != "default" and not Path(model).expanduser().exists():
        raise ModelLoadError(f"model {model!r}: no such preset or path; presets are {', '.join(presets)}, "
                             "or give `default`, an HF model directory or a .gguf file")
    # The runtime's loaders read only metadata here; imported late so presets need no torch.
    from roofline.loaders import open_model

    source = open_model(model)
    path = Path(source.path)
    name = "default" if model == "default" else path.stem if path.is_file() else path.name
    return spec_from_config(source.model_config(), name=name, native_format=native_format(source))


def native_format(source) -> WeightFormat | None:
    """The stored weight format: a GGUF's average bits per weight over all tensors, or an HF torch_dtype."""
    reader = getattr(source, "reader", None)  # a GGUFFile
    if reader is not None:
        tensors = reader.tensors
        bits = 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)
        # The runtime serves a layer int4 only when all its matrices are int4-decodable (quantization "auto").
        layer_types = {kind for name, kind in source.tensor_types().items()
                       if ".layers." in name and name.endswith("_proj.weight")}
        is_int4 = bool(layer_types) and all(gguf_runtime_kernel(kind) == "int4" for kind in layer_types)
        return mixed_format(f"gguf({bits:.2f}b)", bits, "int4" if is_int4 else "int8")
    config = getattr(source, "config", None)  # an HFDirectory's config.json (other sources hold a ModelConfig)
    dtype = config.get("torch_dtype") if isinstance(config, dict) else None
    # a config's torch_dtype may be anything JSON holds (a list, an object): only a known name counts
    return get_weight_format(HF_TORCH_DTYPES[dtype]) if isinstance(dtype, str) and dtype in HF_TORCH_DTYPES else None
