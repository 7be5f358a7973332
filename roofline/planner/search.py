"""Plan search: enumerate formats x TP x PP x replicas x offload x batch and rank by an objective."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from roofline.errors import ConfigError
from roofline.planner.formats import WeightFormat, get_weight_format
from roofline.planner.hardware import HardwareSpec
from roofline.planner.layout import FRACTION_TOLERANCE, Layout, Placement, Workload
from roofline.planner.memory import MemoryBreakdown, max_batch, memory_needed
from roofline.planner.model_spec import ModelSpec
from roofline.planner.predict import Prediction, predict, runtime_kv_format
from roofline.planner.units import Slo

DEFAULT_MAX_BATCH = 1024  # a scheduler's cap on concurrent sequences
DEFAULT_TOP_K = 5
OFFLOAD_STEPS = (0.0, 0.25, 0.5, 0.75, 1.0)  # fractions tried per tier


class Objective(str, enum.Enum):
    """What the search optimizes."""

    THROUGHPUT = "throughput"  # most output tokens/s
    LATENCY = "latency"  # least time for one request (ttft + output_len x tpot)
    COST = "cost"  # least $ per million output tokens


@dataclass(frozen=True)
class PlanRequest:
    """What to plan for: device count, objective, SLO, workload and the search's bounds."""

    workload: Workload
    count: int = 1  # devices available
    objective: Objective = Objective.THROUGHPUT
    slo: Slo = field(default_factory=Slo)
    weight_formats: tuple[str, ...] | None = None  # None: every format the hardware runs well
    max_batch: int = DEFAULT_MAX_BATCH
    allow_offload: bool = True
    top_k: int = DEFAULT_TOP_K

    def __post_init__(self) -> None:
        if self.count < 1 or self.max_batch < 1 or self.top_k < 1:
            raise ConfigError("plan: --count, --max-batch and the number of plans must be at least 1")


@dataclass(frozen=True)
class Plan:
    """One layout at one batch size, with its memory, predictions and the reason it performs so."""

    layout: Layout
    batch: int  # sequences per replica
    max_batch: int  # largest batch that fits in memory (capped by the request's max_batch)
    memory: MemoryBreakdown  # per device at `batch`
    prediction: Prediction
    meets_slo: bool
    reason: str


@dataclass(frozen=True)
class SearchResult:
    """Ranked plans and how much was searched."""

    plans: list[Plan]  # best first; those meeting the SLO when any do
    num_layouts: int  # layouts considered
    num_fitting: int  # layouts where at least batch 1 fits
    is_slo_met: bool  # whether plans meet the SLO (False: the nearest misses are shown)


def candidate_formats(spec: ModelSpec, hw: HardwareSpec, names: tuple[str, ...] | None) -> list[WeightFormat]:
    """Weight formats to try: the given names, or what the hardware runs natively plus int4."""
    if names is not None:
        return [get_weight_format(name) for name in names]
    if hw.is_cpu:
        formats = [get_weight_format(name) for name in ("fp32", "bf16", "int8", "int4")]
    else:
        half = "bf16" if hw.has_dtype("bf16") else "fp16"
        # fp8 and int8 weights cost the same bytes; where fp8 runs natively it is the 8-bit choice.
        eight_bit = "fp8" if hw.has_dtype("fp8") else "int8"
        formats = [get_weight_format(name) for name in (half, eight_bit) if hw.has_dtype(name)]
        formats.append(get_weight_format("int4"))
    native = spec.native_format
    if native is not None and native.name not in {f.name for f in formats} and native.bits_per_weight < 16:
        formats.append(native)
    if hw.runtime is not None:
        # A calibrated runtime: the formats it runs here with measured kernels (others need --quant).
        formats = [fmt for fmt in formats if hw.runtime.kernels(fmt)[0] is not None]
    return formats


def candidate_placements(hw: HardwareSpec) -> list[Placement]:
    """No offload, plus FlexGen-style splits of weights (device/host/disk) and KV (device/host)."""
    placements = [Placement()]
    kv_options = (1.0,) if hw.is_cpu else (1.0, 0.0)
    for on_device in OFFLOAD_STEPS:
        for on_host in OFFLOAD_STEPS:
            on_disk = 1.0 - on_device - on_host
            if on_disk < -FRACTION_TOLERANCE or (hw.is_cpu and on_host > 0):
                continue
            for kv in kv_options:
                placement = Placement(on_device, on_host, max(on_disk, 0.0), kv)
                if placement.is_offloaded:
                    placements.append(placement)
    return placements


def candidate_layouts(spec: ModelSpec, hw: HardwareSpec, request: PlanRequest) -> list[Layout]:
    """Every layout the search scores."""
    degrees = [d for d in (2**i for i in range(request.count.bit_length())) if d <= request.count]
    layouts = []
    for fmt in candidate_formats(spec, hw, request.weight_formats):
        kv_formats = {runtime_kv_format(hw, fmt)} | (set() if hw.is_cpu else {"fp8"})
        for kv in sorted(kv_formats):
            for tp in (d for d in degrees if spec.supports_tp(d)):
                for pp in (d for d in degrees if tp * d <= request.count and d <= spec.num_layers):
                    replicas = request.count // (tp * pp)
                    is_single = tp * pp == 1
                    offload = candidate_placements(hw) if is_single and request.allow_offload else [Placement()]
                    layouts += [Layout(fmt, kv, tp, pp, replicas, placement) for placement in offload]
    return layouts


def candidate_batches(fit: int) -> list[int]:
    """Powers of two up to fit, and fit itself."""
    batches = [2**i for i in range(fit.bit_length()) if 2**i <= fit]
    return batches + ([fit] if fit not in batches else [])


def score(plan_prediction: Prediction, layout: Layout, request: PlanRequest) -> float:
    """Lower is better, for the request's objective."""
    p = plan_prediction
    if request.objective is Objective.LATENCY:
        return p.ttft_s + request.workload.output_len * p.tpot_s
    if request.objective is Objective.COST and p.usd_per_mtok > 0:
        return p.usd_per_mtok
    if request.objective is Objective.COST:  # no price known: devices per token/s
        return layout.num_devices / p.throughput_tok_s
    return -p.throughput_tok_s


def slo_miss(p: Prediction, slo: Slo) -> float:
    """How far a prediction is from the SLO (the worst ratio of predicted to target); <= 1 meets it."""
    ratios = [p.ttft_s / slo.ttft_s if slo.ttft_s else 0.0, p.tpot_s / slo.tpot_s if slo.tpot_s else 0.0]
    return max(ratios)


def explain(p: Prediction, batch: int, limit: str | None) -> str:
    """Why this plan performs as it does, e.g. 'memory-bound at batch 8: 74% of step time is weight reads'."""
    term, share = p.decode_step.dominant_term()
    reason = f"{p.decode_step.bound}-bound at batch {batch}: {share:.0%} of step time is {term}"
    return f"{reason}; {limit}" if limit else reason


def batch_limit(spec: ModelSpec, hw: HardwareSpec, layout: Layout, request: PlanRequest, batch: int,
                fit: int, capped_by_slo: bool) -> str | None:
    """What stops a larger batch: the SLO, device memory, host memory, or nothing (None)."""
    if capped_by_slo:
        return "larger batches miss the SLO"
    if batch < fit or fit >= request.max_batch:
        return None
    over = memory_needed(spec, hw, layout, fit + 1, request.workload.context)
    tier = "device" if over.total > over.capacity else "host"
    return f"{tier} memory caps the batch at {fit}"


def _largest_meeting_batch(spec: ModelSpec, hw: HardwareSpec, layout: Layout, request: PlanRequest,
                           low: int, low_prediction: Prediction, high: int) -> tuple[int, Prediction]:
    """Bisect between a batch meeting the SLO and a larger one missing it; keep the better-scoring batch."""
    best = (low, low_prediction)
    while high - low > 1:
        middle = (low + high) // 2
        prediction = predict(spec, hw, layout, request.workload, middle)
        if request.slo.is_met(prediction.ttft_s, prediction.tpot_s):
            low = middle
            if score(prediction, layout, request) < score(best[1], layout, request):
                best = (middle, prediction)
        else:
            high = middle
    return best


def best_plan_for_layout(spec: ModelSpec, hw: HardwareSpec, layout: Layout, request: PlanRequest) -> Plan | None:
    """The best batch for one layout (preferring batches that meet the SLO), or None when nothing fits."""
    context = request.workload.context
    fit = max_batch(spec, hw, layout, context, request.max_batch)
    if fit == 0:
        return None
    scored = [(b, predict(spec, hw, layout, request.workload, b)) for b in candidate_batches(fit)]
    meeting = [(b, p) for b, p in scored if request.slo.is_met(p.ttft_s, p.tpot_s)]
    if meeting:
        batch, best = min(meeting, key=lambda item: score(item[1], layout, request))
        failing = [b for b, p in scored if b > batch and not request.slo.is_met(p.ttft_s, p.tpot_s)]
        capped = bool(failing) and request.objective is not Objective.LATENCY
        if capped:
            batch, best = _largest_meeting_batch(spec, hw, layout, request, batch, best, min(failing))
    else:
        batch, best = min(scored, key=lambda item: slo_miss(item[1], request.slo))
        capped = False
    return Plan(layout=layout, batch=batch, max_batch=fit,
                memory=memory_needed(spec, hw, layout, batch, context), prediction=best,
                meets_slo=bool(meeting),
                reason=explain(best, batch, batch_limit(spec, hw, layout, request, batch, fit, capped)))


def _rank_key(plan: Plan, request: PlanRequest, is_slo_met: bool) -> tuple[float, int, float]:
    """Sort key: objective (or SLO miss), then fewer devices, then less offloading."""
    primary = score(plan.prediction, plan.layout, request) if is_slo_met else slo_miss(plan.prediction, request.slo)
    return primary, plan.layout.num_devices, -plan.layout.placement.weights_on_device


def keep_useful_offload(plans: list[Plan], request: PlanRequest, is_slo_met: bool) -> list[Plan]:
    """One offload placement per format/parallel layout, and only where it beats not offloading."""
    best: dict[tuple, Plan] = {}
    for plan in plans:
        layout = plan.layout
        key = (layout.weight_format.name, layout.kv_format, layout.tp, layout.pp, layout.placement.is_offloaded)
        if key not in best or _rank_key(plan, request, is_slo_met) < _rank_key(best[key], request, is_slo_met):
            best[key] = plan
    kept = []
    for (*layout_key, is_offloaded), plan in best.items():
        resident = best.get((*layout_key, False))
        if is_offloaded and resident is not None and \
                _rank_key(resident, request, is_slo_met)[0] <= _rank_key(plan, request, is_slo_met)[0]:
            continue
        kept.append(plan)
    return kept


def search(spec: ModelSpec, hw: HardwareSpec, request: PlanRequest) -> SearchResult:
    """Rank layouts for the request's objective; plans meeting the SLO first, else the nearest misses."""
    layouts = candidate_layouts(spec, hw, request)
    plans = [plan for layout in layouts if (plan := best_plan_for_layout(spec, hw, layout, request))]
    meeting = [plan for plan in plans if plan.meets_slo]
    candidates = keep_useful_offload(meeting or plans, request, bool(meeting))
    ranked = sorted(candidates, key=lambda plan: _rank_key(plan, request, bool(meeting)))
    return SearchResult(plans=ranked[:request.top_k], num_layouts=len(layouts),
                        num_fitting=len(plans), is_slo_met=bool(meeting))
