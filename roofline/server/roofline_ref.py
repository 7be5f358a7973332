"""What this hardware allows the served model: the planner's decode step cost at a batch size and context.

The hardware is the saved calibration profile (`roofline calibrate`) when one exists for this kind of
device, else the planner's preset for the device (the generic `cpu` preset, or the GPU's datasheet
preset), and the report says which, so a reader knows how much to trust the fraction.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from roofline.errors import RooflineError
from roofline.planner.cost import decode_stage_cost
from roofline.planner.formats import WeightFormat, get_weight_format
from roofline.planner.hardware import HardwareSpec, get_preset_hardware
from roofline.planner.layout import Layout
from roofline.planner.model_source import native_format
from roofline.planner.model_spec import ModelSpec, spec_from_config
from roofline.planner.profile import default_profile_path, load_profile

CALIBRATION, PRESET = "calibration", "preset"
_FLOAT_FORMATS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_CONTEXT_STEP = 16  # contexts are rounded to this many tokens, so predictions cache well


@dataclass(frozen=True)
class HardwareChoice:
    """The hardware the roofline is computed for, and where its figures come from."""

    spec: HardwareSpec
    source: str  # CALIBRATION (measured here) or PRESET (the planner's figures for this kind of device)
    detail: str  # the profile's path, or why a preset was used


def gpu_preset_name(device_name: str) -> str | None:
    """The preset matching a CUDA device name ("NVIDIA H200" -> "h200"), or None."""
    name = device_name.lower().replace(" ", "")
    if "a100" in name:
        return "a100-80gb" if "80g" in name else "a100-40gb"
    for preset in ("h200", "h100", "mi300x", "a10g", "l4", "t4"):
        if preset in name:
            return preset
    return None


def local_hardware(device: torch.device) -> HardwareChoice:
    """The calibration profile when there is one for this kind of device, else the planner's preset."""
    path = default_profile_path()
    reason = f"no calibration profile at {path}"
    if path.is_file():
        try:
            profile = load_profile(path)
            if profile.device.startswith("cuda") == (device.type == "cuda"):
                return HardwareChoice(profile.to_hardware(), CALIBRATION, str(path))
            reason = f"the calibration profile at {path} is for {profile.device}, not {device.type}"
        except RooflineError as exc:
            reason = str(exc)
    if device.type == "cuda":
        preset = gpu_preset_name(torch.cuda.get_device_name(device))
        if preset is None:
            raise RooflineError(f"{reason}, and no preset matches {torch.cuda.get_device_name(device)!r}: "
                                f"run `roofline calibrate`")
    else:
        preset = "cpu"
    return HardwareChoice(get_preset_hardware(preset), PRESET,
                          f"{reason}: the planner's {preset!r} preset (typical figures, not measured here); "
                          f"run `roofline calibrate` for this machine's own")


def served_weight_format(engine) -> WeightFormat:
    """The weight format the engine runs: a GGUF's own mix under quantization auto, int8/int4, else its dtype."""
    method = engine.config.quant.method
    if method in ("int8", "int4"):
        return get_weight_format(method)
    float_format = get_weight_format(_FLOAT_FORMATS.get(engine.runner.dtype, "fp32"))
    if method == "auto":
        from roofline.loaders import open_model

        try:
            source = open_model(engine.config.model)
        except RooflineError:  # an engine built from another source (random weights): its dtype
            return float_format
        if getattr(source, "reader", None) is not None and source.model_config() == engine.model_config:
            return native_format(source) or float_format
    return float_format


class RooflineReference:
    """Decode tok/s this hardware allows the served model at a batch size and context (cached)."""

    def __init__(self, spec: ModelSpec, hardware: HardwareChoice, weight_format: WeightFormat, kv_format: str) -> None:
        self.spec = spec
        self.hardware = hardware
        self.layout = Layout(weight_format, kv_format)
        self._predict = lru_cache(maxsize=1024)(self._predict_uncached)

    def decode_tok_s(self, batch: int, context: float) -> float:
        """Output tokens/s of `batch` sequences decoding together at `context` tokens each."""
        rounded = max(_CONTEXT_STEP, _CONTEXT_STEP * round(context / _CONTEXT_STEP))
        return self._predict(batch, rounded)

    def _predict_uncached(self, batch: int, context: int) -> float:
        step = decode_stage_cost(self.spec, self.hardware.spec, self.layout, batch, float(context))
        return batch / step.time_s

    def describe(self) -> dict:
        """What the roofline is computed from, for the stats JSON."""
        return {"hardware": self.hardware.spec.name, "source": self.hardware.source, "detail": self.hardware.detail,
                "model": self.spec.name, "weight_format": self.layout.weight_format.name,
                "kv_format": self.layout.kv_format}


def build_reference(engine) -> RooflineReference:
    """The reference for an LLMEngine: its model's shape and formats on this machine's hardware."""
    spec = spec_from_config(engine.model_config, name=str(engine.config.model))
    kv_format = "int8" if engine.runner.kv_dtype == torch.int8 else _FLOAT_FORMATS.get(engine.runner.dtype, "fp32")
    return RooflineReference(spec, local_hardware(engine.runner.device), served_weight_format(engine), kv_format)
