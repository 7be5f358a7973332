"""argparse wiring of `roofline plan` and `roofline calibrate`; each handler returns an exit code."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from roofline.errors import ConfigError, RooflineError
from roofline.planner.eager import RuntimeCosts
from roofline.planner.hardware import HardwareSpec, with_overrides
from roofline.planner.hardware_source import load_hardware
from roofline.planner.layout import Workload
from roofline.planner.model_presets import model_presets
from roofline.planner.model_source import load_model_spec
from roofline.planner.model_spec import ModelSpec
from roofline.planner.profile import default_profile_path, save_profile
from roofline.planner.report import format_report, plot_roofline, report_json
from roofline.planner.search import DEFAULT_MAX_BATCH, DEFAULT_TOP_K, Objective, PlanRequest, search
from roofline.planner.units import format_bytes, format_rate, parse_quantity, parse_slo

DEFAULT_CONTEXT = 4096
DEFAULT_OUTPUT_LEN = 256
EXIT_OK, EXIT_NO_PLAN, EXIT_USAGE = 0, 1, 2


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Register `plan` on an argparse subparsers object; sets func=run_plan."""
    parser = subparsers.add_parser(
        "plan", help="predict memory, latency, throughput and cost of serving a model on given hardware",
        description="Search quantization x tensor/pipeline parallel x replicas x batch x offload "
                    "for a model on hardware, using the roofline model.")
    parser.add_argument("model", help="a preset (llama-3.1-8b, ...), `default`, an HF directory or a .gguf")
    parser.add_argument("--hardware", default="local",
                        help="a preset (t4, l4, a10g, a100-40gb, a100-80gb, h100, h200, mi300x, cpu), "
                             "`local` (run `roofline calibrate` first) or a .json/.yaml spec file")
    parser.add_argument("--count", type=int, default=1, help="number of devices (default 1)")
    parser.add_argument("--slo", help="latency target, e.g. ttft=500ms,tpot=50ms")
    parser.add_argument("--objective", choices=[o.value for o in Objective], default="throughput")
    parser.add_argument("--context", type=int, help=f"tokens per sequence, prompt + output (default {DEFAULT_CONTEXT})")
    parser.add_argument("--output-len", type=int, default=DEFAULT_OUTPUT_LEN, help="output tokens per request")
    parser.add_argument("--quant", help="weight formats to consider, comma-separated (e.g. bf16,int4)")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="most sequences per replica")
    parser.add_argument("--no-offload", action="store_true", help="do not consider offloading to host RAM or disk")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP_K, help="plans to show")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", metavar="FILE.png", help="save a roofline chart of the best plan (needs matplotlib)")
    engine = parser.add_argument_group(
        "the engine's placement within a memory limit (what `roofline generate/serve --memory-limit` would run; "
        "needs `default`, an HF directory or a .gguf, and this machine's hardware)")
    engine.add_argument("--memory-limit", help="bytes for weights, KV cache and activations, e.g. 600MB")
    engine.add_argument("--offload", default="auto", help="auto (the default), none, or w=DEVICE/HOST/DISK[,kv=...]")
    engine.add_argument("--max-model-len", type=int, help="context limit, as on generate (default: the model's)")
    engine.add_argument("--max-num-seqs", type=int, default=64, help="sequences in one step, as on generate")
    engine.add_argument("--kv-cache-memory", help="KV cache budget, as on generate (counts inside the limit)")
    engine.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    engine.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4"])
    engine.add_argument("--device", default="auto", help="auto, cpu or cuda")
    overrides = parser.add_argument_group("hardware overrides (units allowed: 80GB, 3.35TB/s, 312T)")
    overrides.add_argument("--memory", help="device memory")
    overrides.add_argument("--bandwidth", help="device memory bandwidth")
    overrides.add_argument("--flops", help="FLOP/s per dtype, e.g. bf16=312T,fp32=19.5T")
    overrides.add_argument("--interconnect", help="device-to-device bandwidth per direction")
    overrides.add_argument("--host-link", help="host-to-device bandwidth (PCIe)")
    overrides.add_argument("--host-memory", help="host RAM available for offloading, per device")
    overrides.add_argument("--disk-bandwidth", help="disk read bandwidth")
    overrides.add_argument("--price", type=float, help="$ per device-hour")
    parser.set_defaults(func=run_plan)
    return parser


def add_calibrate_parser(subparsers) -> argparse.ArgumentParser:
    """Register `calibrate` on an argparse subparsers object; sets func=run_calibrate."""
    parser = subparsers.add_parser(
        "calibrate", help="measure this machine's bandwidth and FLOP/s for `--hardware local`",
        description="Measure memory, GEMV, matmul, host-link and disk rates, and the costs of roofline's own "
                    "runtime here (matmul kernels by rows and width, layer dispatch, paged attention, "
                    "sampling), and save a profile (about a minute; --quick: about ten seconds).")
    parser.add_argument("--output", type=Path, help=f"profile path (default {default_profile_path()})")
    parser.add_argument("--quick", action="store_true", help="small sizes, one curve width: about ten seconds, noisier")
    parser.add_argument("--json", action="store_true", help="print the profile as JSON")
    parser.set_defaults(func=run_calibrate)
    return parser


def hardware_from_args(args: argparse.Namespace) -> HardwareSpec:
    """The --hardware spec with any override flags applied."""
    def quantity(flag: str) -> float | None:
        value = getattr(args, flag)
        return None if value is None else parse_quantity(value, f"--{flag.replace('_', '-')}")

    flops = None
    if args.flops:
        flops = {}
        for item in args.flops.split(","):
            dtype, sep, rate = item.partition("=")
            if not sep:
                raise ConfigError(f"--flops: cannot read {item!r}; write e.g. bf16=312T,fp32=19.5T")
            flops[dtype.strip().lower()] = parse_quantity(rate, f"--flops {dtype}")
    return with_overrides(load_hardware(args.hardware), {
        "memory_bytes": quantity("memory"), "memory_bandwidth": quantity("bandwidth"), "flops": flops,
        "interconnect_bandwidth": quantity("interconnect"), "host_link_bandwidth": quantity("host_link"),
        "host_memory_bytes": quantity("host_memory"), "disk_bandwidth": quantity("disk_bandwidth"),
        "usd_per_hour": args.price})


def workload_from_args(args: argparse.Namespace, spec: ModelSpec) -> Workload:
    """Prompt and output lengths from --context and --output-len, bounded by the model's context."""
    context = args.context if args.context is not None else min(DEFAULT_CONTEXT, spec.max_context)
    if context > spec.max_context:
        raise ConfigError(f"--context {context} exceeds {spec.name}'s {spec.max_context} tokens")
    output_len = min(args.output_len, context // 2)
    if context < 2 or output_len < 1:
        raise ConfigError("--context must be at least 2 tokens and --output-len at least 1")
    return Workload(prompt_len=context - output_len, output_len=output_len)


def engine_placement(args: argparse.Namespace) -> dict:
    """The placement and predicted rate the engine would choose for --model within --memory-limit, from the
    model's metadata (no weights are read), through the engine's own function (offload.plan_for_source)."""
    if args.hardware != "local" or any(getattr(args, f) is not None for f in (
            "memory", "bandwidth", "flops", "interconnect", "host_link", "host_memory", "disk_bandwidth")):
        raise ConfigError("--memory-limit plans what the engine would run on this machine: leave out --hardware "
                          "and the hardware overrides (use --memory for a preset's device memory)")
    if args.model.lower() in model_presets():
        raise ConfigError(f"--memory-limit needs the model itself (`default`, an HF directory or a .gguf), not the "
                          f"preset {args.model!r}; for a preset use --memory")
    from roofline.config import OffloadConfig
    from roofline.engine.model_runner import resolve_device, resolve_dtype
    from roofline.loaders import open_model
    from roofline.offload.plan import plan_for_source
    from roofline.quant.transform import quantizes

    limit = int(parse_quantity(args.memory_limit, "--memory-limit"))
    kv_memory = None if args.kv_cache_memory is None else int(parse_quantity(args.kv_cache_memory,
                                                                             "--kv-cache-memory"))
    source = open_model(args.model)
    model_config = source.model_config()
    device = resolve_device(args.device)
    dtype_name = str(resolve_dtype(args.dtype, device)).removeprefix("torch.")
    tensor_types = source.tensor_types() if hasattr(source, "tensor_types") else None
    plan = plan_for_source(source, model_config, OffloadConfig(memory_limit=limit, offload=args.offload), dtype_name,
                           quantizes(args.quantization, tensor_types), device.type == "cuda", args.max_model_len,
                           args.max_num_seqs, kv_memory)
    memory = plan.memory
    return {"model": args.model, "memory_limit_bytes": limit, "placement": plan.placement.describe(),
            "predicted_tok_s": plan.predicted_tok_s, "batch": plan.batch, "hardware": plan.hardware,
            "kv_cache_budget_bytes": plan.kv_bytes, "start_up_line": f"roofline: {plan.describe()}",
            "device_memory_bytes": None if memory is None else {
                "weights_and_buffers": memory.weights, "kv_cache": memory.kv_cache,
                "activations": memory.activations, "total": memory.total}}


def _format_engine_placement(result: dict) -> str:
    lines = [f"{result['model']} within {format_bytes(result['memory_limit_bytes'])} "
             f"(hardware {result['hardware']}):",
             f"  placement   {result['placement']}  (layer weights device/host/disk %, KV device/host %)",
             f"  predicted   {result['predicted_tok_s']:.2f} tok/s at batch {result['batch']}"]
    memory = result["device_memory_bytes"]
    if memory is not None:
        lines.append(f"  memory      weights + stream buffers {format_bytes(memory['weights_and_buffers'])}, KV cache "
                     f"{format_bytes(memory['kv_cache'])}, activations {format_bytes(memory['activations'])} "
                     f"(at batch {result['batch']})")
    if result["kv_cache_budget_bytes"] is not None:
        lines.append(f"  KV budget   {format_bytes(result['kv_cache_budget_bytes'])}: what the limit leaves the cache")
    lines.append(f"  start-up    `roofline generate/serve --model {result['model']} --memory-limit ...` prints: "
                 f"{result['start_up_line']}")
    return "\n".join(lines)


def run_plan(args: argparse.Namespace) -> int:
    """`roofline plan`: search layouts and print a table (or JSON); 1 when no plan meets the SLO."""
    if args.memory_limit is not None:
        try:
            result = engine_placement(args)
        except RooflineError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USAGE
        print(json.dumps(result, indent=2) if args.json else _format_engine_placement(result))
        return EXIT_OK
    try:
        spec = load_model_spec(args.model)
        hw = hardware_from_args(args)
        quant = tuple(name.strip() for name in args.quant.split(",")) if args.quant else None
        request = PlanRequest(workload=workload_from_args(args, spec), count=args.count,
                              objective=Objective(args.objective), slo=parse_slo(args.slo),
                              weight_formats=quant, max_batch=args.max_batch,
                              allow_offload=not args.no_offload, top_k=args.top)
        result = search(spec, hw, request)
        if args.json:
            print(json.dumps(report_json(spec, hw, request, result), indent=2))
        else:
            print(format_report(spec, hw, request, result))
        if args.plot and result.plans:
            plot_roofline(spec, hw, result.plans[0], request, args.plot)
    except RooflineError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK if result.plans and result.is_slo_met else EXIT_NO_PLAN


def runtime_lines(rc: RuntimeCosts) -> list[str]:
    """What calibrate measured of this runtime's eager costs, one line per term."""
    lines = []
    for label, by_kernel in (("layers", rc.layer_curves), ("head", rc.head_curves)):
        for kernel, curves in by_kernel.items():
            name = rc.dtype if kernel == "float" else kernel
            for width, points in curves:
                lines.append(f"{label} {name} h={width}".ljust(22) + ", ".join(
                    f"{rows:.0f}: {format_rate(rate, 'FLOP/s')}" for rows, rate in points) + "  (rows: rate)")
    lines += [f"layer ops     {rc.layer_dispatch_s * 1e6:.0f} us dispatch per layer + "
              f"{rc.element_s * 1e12:.0f} ps per activation element",
              f"attention     decode {rc.decode_attention_s * 1e6:.0f} us per layer + "
              f"KV at {format_rate(rc.decode_kv_bandwidth, 'B/s')}; "
              f"prefill {rc.prefill_attention_s * 1e6:.0f} us per chunk + {rc.prefill_attention_unit_s * 1e12:.0f} "
              "ps per causal pair x head dim x query head",
              f"sampling      {rc.sample_row_s * 1e6:.0f} us per sequence + {rc.sample_logit_s * 1e12:.0f} ps per logit",
              f"scheduling    {rc.schedule_step_s * 1e6:.0f} us per step + {rc.schedule_sequence_s * 1e6:.0f} us per "
              "sequence (plan, input batch, counters)"]
    return lines


def run_calibrate(args: argparse.Namespace) -> int:
    """`roofline calibrate`: measure, save the profile and print what was measured."""
    from roofline.calibrate.run import calibrate

    path = args.output or default_profile_path()
    try:
        profile = calibrate(is_quick=args.quick, disk_dir=path.parent)
        save_profile(profile, path)
    except (RooflineError, OSError) as error:
        print(f"error: calibrate: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(path.read_text(), end="")
        return EXIT_OK
    flops = ", ".join(f"{dtype} {format_rate(rate, 'FLOP/s')}" for dtype, rate in profile.matmul_flops.items())
    lines = [f"device        {profile.device} ({profile.num_threads} threads), {format_bytes(profile.memory_bytes)}",
             f"memory read   {format_rate(profile.read_bandwidth, 'B/s')} (sum), "
             f"copy {format_rate(profile.copy_bandwidth, 'B/s')} (read + write)",
             f"GEMV          {format_rate(profile.gemv_bandwidth, 'B/s')} (batch-1 decode's ceiling; used as bandwidth)",
             f"matmul        {flops}",
             f"op overhead   {profile.op_overhead_s * 1e6:.1f} us per tiny op",
             f"disk read     {format_rate(profile.disk_bandwidth, 'B/s')}"]
    if profile.runtime is not None:
        lines += runtime_lines(profile.to_hardware().runtime)
    if profile.host_link_bandwidth is not None:
        lines.append(f"host->device  {format_rate(profile.host_link_bandwidth, 'B/s')} (pinned)")
    lines += [f"note          {note}" for note in profile.notes]
    lines.append(f"saved         {path}  (use: roofline plan MODEL --hardware local)")
    print("\n".join(lines))
    return EXIT_OK
