"""Engine arguments shared by every command that loads a model: the flags, the LLM they describe, the model's
served name, and the start-up collector pause. cli.py, server/commands.py, batch.py and the parallel front
ends all build on this module (nothing imports cli.py's internals)."""

from __future__ import annotations

import argparse
import gc
import sys


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine flags every model-loading command takes (generate, chat, kernels, batch, serve)."""
    p.add_argument("--model", default="default", help="'default', a Hugging Face directory or a .gguf file")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: $ROOFLINE_NUM_THREADS, $OMP_NUM_THREADS, or all cores)")
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="KV cache budget, e.g. 512MiB or 2GiB (default: a share of free memory)")
    p.add_argument("--seed", type=int, default=0, help="seed for requests that bring none")
    p.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="weights: auto (a GGUF file's own precision, a float checkpoint as is), none, int8, int4")
    p.add_argument("--quantization-group-size", type=int, default=32, choices=[32, 64, 128],
                   help="int4: input values per scale/zero pair")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"],
                   help="auto: the model dtype; int8: a quarter of fp32's KV memory, a scale per token and head")
    p.add_argument("--kernels", default="auto",
                   help="low-bit matmul kernels: auto (measured on this machine, cached), default (built-in rule), "
                        "or a kernel name from `roofline kernels`")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step for each batch bucket at start-up (about a minute per bucket "
                        "on 2 cores; faster steps afterwards)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="never compile (the default unless --compile; wins over --compile)")
    p.add_argument("--kernel-accuracy", default="bf16", choices=["exact", "bf16", "int8"],
                   help="loosest activation rounding a kernel may use (the output head is always exact unless int8)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences in one step (default 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="tokens in one step, prompt chunks and decodes together (default 512)")
    p.add_argument("--max-decode-stall-ms", type=stall_ms, default=250.0,
                   help="while sequences decode, cut prompt chunks so a step takes about this long (default 250; "
                        "'none': whole-budget chunks)")
    p.add_argument("--scheduling", default="slo", choices=["fifo", "priority", "slo"],
                   help="fifo: arrival order; priority: (priority, arrival); slo (default): priority, fair shares "
                        "across tenants, and latency targets (docs/scheduling.md)")
    p.add_argument("--memory-limit", type=parse_bytes, default=None,
                   help="memory for weights, KV cache and activations, e.g. 600MB; layers that do not fit are "
                        "streamed from host RAM or disk (docs/offload.md)")
    p.add_argument("--offload", default="auto",
                   help="auto (the planner's placement within --memory-limit), none, or a placement "
                        "w=DEVICE/HOST/DISK[,kv=DEVICE/HOST] in percent, e.g. w=20/80/0,kv=100/0")
    p.add_argument("--offload-dir", default=None,
                   help="where off-device layers are written (default: a temporary directory, removed at exit)")


def parse_bytes(text: str) -> int:
    """A size flag: an int of bytes or a size string (512MiB, 600MB, 2GiB)."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    t = text.strip().lower()
    num = t.rstrip("abgikm")
    unit = t[len(num):]
    try:
        value = float(num) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512MiB or 2GiB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return int(value)


def stall_ms(text: str) -> float | None:
    """--max-decode-stall-ms: positive milliseconds, or 'none'."""
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of milliseconds or 'none': {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of milliseconds, got {text!r}")
    return value


def make_llm(args: argparse.Namespace):
    """The LLM the engine flags describe; prints the offload placement when layers are streamed."""
    if sys.stderr.isatty():  # importing torch and opening the model take seconds before the progress bar shows
        print(f"roofline: loading {args.model} ...", file=sys.stderr, flush=True)
    from roofline.llm import LLM

    llm = LLM(model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
              seed=args.seed, num_threads=args.threads, kv_cache_memory=args.kv_cache_memory,
              quantization=args.quantization, quantization_group_size=args.quantization_group_size,
              kv_cache_dtype=args.kv_cache_dtype, kernels=args.kernels, kernel_accuracy=args.kernel_accuracy,
              compile=args.compile, enforce_eager=args.enforce_eager, show_progress=sys.stderr.isatty(),
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_decode_stall_ms=args.max_decode_stall_ms, scheduling=args.scheduling,
              tenant_weights=getattr(args, "tenant_weights", None),
              memory_limit=getattr(args, "memory_limit", None), offload=getattr(args, "offload", "auto"),
              offload_dir=getattr(args, "offload_dir", None))
    resume_gc()  # the model is loaded: what is made from now on is mostly short-lived
    plan = llm.engine.runner.offload_plan
    if plan is not None:  # the placement and the rate the planner predicts for it, at start-up (docs/offload.md)
        print(f"roofline: {plan.describe()}", file=sys.stderr, flush=True)
    return llm


def served_model_name(model: str) -> str:
    """The id clients see: the default model's name for "default", else the --model value as given."""
    if model == "default":
        from roofline.loaders import DEFAULT_MODEL_FILE

        return DEFAULT_MODEL_FILE.split(".")[0]
    return model


_gc_paused = False  # whether pause_gc turned the collector off


def pause_gc() -> None:
    """Turn the cyclic collector off until the model is loaded (make_llm turns it back on).

    Start-up makes ~200k long-lived objects (torch's and the engine's modules, the model): the collector
    would scan them again and again as they are made, ~0.2-0.5 s of every start. Only for a process's own
    entry point (cli.main): in a caller's process, freezing would keep its garbage.
    """
    global _gc_paused
    if gc.isenabled():
        gc.disable()
        _gc_paused = True


def resume_gc() -> None:
    """Turn the collector back on if pause_gc turned it off."""
    global _gc_paused
    if _gc_paused:
        # freeze first: the start-up's objects, all still in the youngest generation, are kept out of every
        # later collection instead of being scanned in the first steps (the start-up's ~1 MB of garbage
        # cycles among them, kept for good)
        gc.freeze()
        gc.enable()
        _gc_paused = False
