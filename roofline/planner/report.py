"""Presenting a plan search: an aligned text table, a JSON document, and a roofline chart."""

from __future__ import annotations

from dataclasses import asdict

from roofline.errors import ConfigError
from roofline.planner.cost import crossover_batch
from roofline.planner.formats import default_kv_format, get_weight_format
from roofline.planner.hardware import HardwareSpec
from roofline.planner.layout import Layout
from roofline.planner.model_spec import ModelSpec
from roofline.planner.predict import tpot_s
from roofline.planner.search import Plan, PlanRequest, SearchResult, candidate_formats
from roofline.planner.units import format_bytes, format_rate, format_seconds

KIB = 1024
PLOT_POINTS = 48  # batch sizes sampled for the chart
PLOT_MAX_BATCH = 1 << 14  # widest batch axis of the chart


def _half_format(hw: HardwareSpec) -> str:
    return "fp32" if hw.is_cpu else ("bf16" if hw.has_dtype("bf16") else "fp16")


def summary_lines(spec: ModelSpec, hw: HardwareSpec, request: PlanRequest, result: SearchResult) -> list[str]:
    """The header above the table: model, hardware, workload and the crossover batch."""
    formats = candidate_formats(spec, hw, request.weight_formats)
    weights = ", ".join(f"{f.name} {format_bytes(spec.weight_bytes(f))}" for f in formats)
    half = get_weight_format(_half_format(hw))
    kv = spec.kv_bytes_per_token(2) / KIB
    dtype = half.compute_dtype
    price = f", ${hw.usd_per_hour:.2f}/h each" if hw.usd_per_hour > 0 else ""
    crossover = crossover_batch(spec, hw, Layout(half, default_kv_format(half)))
    workload = request.workload
    return [
        f"model     {spec.name}: {spec.num_params / 1e9:.2f}B parameters; weights {weights}; "
        f"KV {kv:.1f} KiB/token at 16 bits",
        f"hardware  {request.count} x {hw.name}: {format_bytes(hw.memory_bytes)}, "
        f"{format_rate(hw.memory_bandwidth, 'B/s')}, {format_rate(hw.flops_for(dtype), 'FLOP/s')} {dtype}, "
        f"ridge {hw.ridge_point(dtype):.0f} FLOP/byte{price}",
        f"workload  prompt {workload.prompt_len} + output {workload.output_len} tokens "
        f"(context {workload.context}); objective {request.objective.value}; SLO {request.slo}",
        f"roofline  decode turns compute-bound at batch ~{crossover:.0f} ({half.name}, one device, short context); "
        f"searched {result.num_layouts} layouts, {result.num_fitting} fit",
    ]


def plan_row(rank: int, plan: Plan) -> list[str]:
    """One table row."""
    layout, p, mem = plan.layout, plan.prediction, plan.memory
    price = f"{p.usd_per_mtok:.2f}" if p.usd_per_mtok > 0 else "-"
    return [str(rank), layout.weight_format.name, layout.kv_format, str(layout.tp), str(layout.pp),
            str(layout.replicas), layout.placement.describe(), str(plan.batch),
            f"{mem.total / 1e9:.1f}/{mem.capacity / 1e9:.0f}", format_seconds(p.ttft_s),
            format_seconds(p.tpot_s), f"{p.throughput_tok_s:.0f}", price, plan.reason]


TABLE_HEADER = ["#", "quant", "kv", "tp", "pp", "rep", "offload", "batch", "mem/dev GB", "ttft",
                "tpot", "tok/s", "$/Mtok", "why"]
LEFT_ALIGNED = {"quant", "kv", "offload", "why"}


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """Plain-text table with aligned columns (text left, numbers right)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [cell.ljust(w) if name in LEFT_ALIGNED else cell.rjust(w)
                 for cell, w, name in zip(cells, widths, header)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(header), *(line(row) for row in rows)])


def format_report(spec: ModelSpec, hw: HardwareSpec, request: PlanRequest, result: SearchResult) -> str:
    """The full text report of `roofline plan`."""
    lines = summary_lines(spec, hw, request, result)
    if not result.plans:
        lines.append("no layout fits: the weights exceed memory even fully offloaded; "
                     "add devices or a host with more RAM")
        return "\n".join(lines)
    if not result.is_slo_met:
        lines.append(f"no plan meets SLO {request.slo}; the nearest misses follow")
    rows = [plan_row(rank, plan) for rank, plan in enumerate(result.plans, start=1)]
    lines += ["", format_table(rows, TABLE_HEADER),
              "", "tok/s: output tokens/s over all replicas with prefill amortized; "
              "mem/dev: fullest device at that batch; offload: weights device/host/disk %, KV device/host %"]
    return "\n".join(lines)


def report_json(spec: ModelSpec, hw: HardwareSpec, request: PlanRequest, result: SearchResult) -> dict:
    """A JSON-ready document of the search: inputs and every ranked plan."""
    def plan_dict(plan: Plan) -> dict:
        layout = plan.layout
        pred = asdict(plan.prediction)
        for step in ("decode_step", "prefill_step"):
            pred[step]["time_s"] = getattr(plan.prediction, step).time_s
            pred[step]["bound"] = getattr(plan.prediction, step).bound
        return {"weight_format": layout.weight_format.name, "kv_format": layout.kv_format,
                "tp": layout.tp, "pp": layout.pp, "replicas": layout.replicas,
                "num_devices": layout.num_devices, "placement": asdict(layout.placement),
                "batch": plan.batch, "max_batch": plan.max_batch,
                "memory": {**asdict(plan.memory), "total": plan.memory.total},
                "prediction": pred, "meets_slo": plan.meets_slo, "reason": plan.reason}

    return {"model": {**{k: v for k, v in asdict(spec).items() if k != "native_format"},
                      "num_params": spec.num_params},
            "hardware": asdict(hw), "count": request.count, "objective": request.objective.value,
            "slo": asdict(request.slo), "workload": asdict(request.workload),
            "num_layouts": result.num_layouts, "num_fitting": result.num_fitting,
            "is_slo_met": result.is_slo_met, "plans": [plan_dict(plan) for plan in result.plans]}


def plot_roofline(spec: ModelSpec, hw: HardwareSpec, plan: Plan, request: PlanRequest, path: str) -> None:
    """Save a chart of predicted decode tok/s against batch for plan's layout, with both ceilings."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: `pip install matplotlib`") from None
    layout, context = plan.layout, request.workload.mean_decode_context
    # Past the memory limit too, so the chart shows where the ceilings cross.
    crossover = crossover_batch(spec, hw, layout, context) or plan.max_batch
    top = int(min(max(plan.max_batch, 2 * crossover, 2), PLOT_MAX_BATCH))
    batches = sorted({max(1, round(top ** (i / (PLOT_POINTS - 1)))) for i in range(PLOT_POINTS)})
    predicted, memory_ceiling, compute_ceiling = [], [], []
    for batch in batches:
        tpot, stage = tpot_s(spec, hw, layout, batch, context)
        predicted.append(batch / tpot)
        memory_ceiling.append(batch / (layout.pp * stage.memory_s))
        compute_ceiling.append(batch / (layout.pp * stage.compute_s))
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.loglog(batches, memory_ceiling, "--", label="bandwidth ceiling (weights + KV reads)")
    axes.loglog(batches, compute_ceiling, "--", label="compute ceiling")
    axes.loglog(batches, predicted, "-", linewidth=2, label="predicted decode")
    axes.axvline(plan.batch, color="grey", linewidth=0.8, label=f"plan batch {plan.batch}")
    if plan.max_batch < top:
        axes.axvspan(plan.max_batch, top, color="grey", alpha=0.15, label="does not fit in memory")
    axes.set_xlabel("batch (sequences per replica)")
    axes.set_ylabel("decode tokens/s per replica")
    axes.set_title(f"{spec.name} on {layout.tp * layout.pp} x {hw.name}, {layout.weight_format.name}, "
                   f"context {context:.0f}")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
