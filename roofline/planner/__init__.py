"""Inference arithmetic: model and hardware specs, the roofline cost model, plan search, calibration."""

from roofline.planner.cost import StepCost, arithmetic_intensity, crossover_batch, decode_stage_cost, prefill_cost
from roofline.planner.formats import WeightFormat, get_weight_format, weight_formats
from roofline.planner.hardware import HardwareSpec, hardware_presets
from roofline.planner.hardware_source import load_hardware
from roofline.planner.layout import Layout, Placement, Workload
from roofline.planner.memory import MemoryBreakdown, max_batch, memory_needed
from roofline.planner.model_presets import model_presets
from roofline.planner.model_source import load_model_spec
from roofline.planner.model_spec import ModelSpec, spec_from_config
from roofline.planner.predict import Prediction, RatePrediction, predict, predict_rates
from roofline.planner.profile import CalibrationProfile, default_profile_path, load_profile
from roofline.planner.search import Objective, Plan, PlanRequest, SearchResult, search
from roofline.planner.units import Slo, parse_slo

__all__ = [
    "CalibrationProfile", "HardwareSpec", "Layout", "MemoryBreakdown", "ModelSpec", "Objective", "Placement",
    "Plan", "PlanRequest", "Prediction", "RatePrediction", "SearchResult", "Slo", "StepCost", "WeightFormat",
    "Workload", "arithmetic_intensity", "crossover_batch", "decode_stage_cost", "default_profile_path",
    "get_weight_format", "hardware_presets", "load_hardware", "load_model_spec", "load_profile", "max_batch",
    "memory_needed", "model_presets", "parse_slo", "predict", "predict_rates", "prefill_cost", "search",
    "spec_from_config", "weight_formats",
]
