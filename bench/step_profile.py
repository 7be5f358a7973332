"""Where a decode step's time goes: model matmuls, everything else in the model, and the engine around it,
with llama.cpp decoding the same GGUF in the same process as the baseline.

    python bench/step_profile.py [--model default] [--batches 1,64] [--steps 64] [--prompt-len 128]
                                 [--quantization auto] [--no-llama-cpp] [--json out.json]

For each batch size B: B sequences are prefilled, then `steps` decode steps are timed through
`LLMEngine.step()`. Each step's time is split into
  - model: the model's forward, the head (compute_logits) and the sampler;
  - engine: the rest of step() (schedule, runner state and input update, output processing);
and, over a separate profiled run of the same steps, the model's time into matmul kernels
(self time of the GEMM/GEMV ops) and non-matmul time (model time minus that: small ops, Python,
dispatch). The split uses only public hooks, so it measures older commits too
(`PYTHONPATH=<checkout of the other commit> python bench/step_profile.py`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections import defaultdict

import torch
from machine import cpu_name

# Self time of these ops is matmul work; everything else inside the model is the "non-matmul" cost.
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_int_mm", "aten::_weight_int8pack_mm",
              "aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int4pack_mm", "quantized::linear_dynamic",
              "quantized::linear", "aten::_scaled_mm", "aten::baddbmm")


def dispatch() -> str:
    """torch's CPU kernel dispatch level, which ATEN_CPU_CAPABILITY can lower."""
    capability = torch.backends.cpu.get_cpu_capability()
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    return f"{capability}" + (f" (ATEN_CPU_CAPABILITY={forced}, DNNL_MAX_CPU_ISA="
                              f"{os.environ.get('DNNL_MAX_CPU_ISA', '-')})" if forced else "")


class Timers:
    """Wraps callables so their wall time accumulates under a name."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[name] += time.perf_counter() - t0
        return timed


class TimedModel:
    """Stands in for the runner's model: times its forward and head without touching the module itself
    (changing a module's attributes would invalidate a compiled forward's guards)."""

    def __init__(self, model, timers: Timers) -> None:
        self._model, self._timers = model, timers
        self._forward = timers.wrap("forward", model)
        self.compute_logits = timers.wrap("head", model.compute_logits)

    def __call__(self, *args, **kwargs):
        return self._forward(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def make_prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 40000, (n, length), generator=g).tolist()


def start_decoding(engine, batch: int, prompt_len: int, steps: int) -> None:
    """Add `batch` greedy requests long enough for every timed step, and run steps until all are decoding."""
    from roofline import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=steps * 4 + 16, ignore_eos=True)
    for i, p in enumerate(make_prompts(batch, prompt_len)):
        engine.add_request(f"b{batch}-{i}", p, params)
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                          for r in engine.scheduler.running):
        engine.step()


def measure(engine, batch: int, steps: int, prompt_len: int) -> dict:
    runner = engine.runner
    timers = Timers()
    compiled = getattr(runner, "compiled_forward", None)
    originals = (runner.model, runner.sampler, compiled)
    runner.model = TimedModel(runner.model, timers)
    runner.sampler = timers.wrap("sampler", runner.sampler)
    if compiled is not None:
        runner.compiled_forward = timers.wrap("forward", compiled)
    try:
        start_decoding(engine, batch, prompt_len, steps)
        for _ in range(4):  # warm-up decode steps
            engine.step()
        timers.total.clear()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        step_s = (time.perf_counter() - t0) / steps
        parts = {k: v / steps for k, v in timers.total.items()}
        # A second run of the same steps under the profiler: kernel self times (the profiler's own
        # overhead inflates the small ops, so only the matmul kernels' time is taken from it).
        timers.total.clear()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine.step()
        events = prof.key_averages()
        matmul_s = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e6 / steps
        ops_per_step = sum(e.count for e in events) / steps
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    finally:
        runner.model, runner.sampler = originals[:2]
        if compiled is not None:
            runner.compiled_forward = compiled
        engine.abort(list(engine.groups))
        while engine.has_unfinished_requests():
            engine.step()
    model_s = parts.get("forward", 0) + parts.get("head", 0) + parts.get("sampler", 0)
    return {
        "batch": batch, "step_ms": step_s * 1e3, "tok_s": batch / step_s,
        "forward_ms": parts.get("forward", 0) * 1e3, "head_ms": parts.get("head", 0) * 1e3,
        "sampler_ms": parts.get("sampler", 0) * 1e3, "engine_ms": (step_s - model_s) * 1e3,
        "matmul_ms": matmul_s * 1e3, "non_matmul_ms": (model_s - matmul_s) * 1e3,
        "ops_per_step": ops_per_step,
        "top_ops": [(e.key, e.count / steps, e.self_cpu_time_total / 1e3 / steps) for e in top],
    }


def llama_cpp_decode(path: str, batch: int, steps: int, prompt_len: int) -> float | None:
    """llama.cpp's aggregate decode tokens/s for `batch` sequences, or None when it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from llama_cpp_batch import run_batched

    return run_batched(llama_cpp, path, make_prompts(batch, prompt_len), steps + 1, batch,
                       torch.get_num_threads())["decode_tps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--compile", action="store_true",
                        help="also build the compiled decode step and measure it against eager in the same process")
    args = parser.parse_args()

    from roofline import LLM
    from roofline.loaders import resolve_model_path

    batches = [int(b) for b in args.batches.split(",")]
    extra = {"compile": True} if args.compile else {}
    t0 = time.perf_counter()
    llm = LLM(args.model, dtype="float32", quantization=args.quantization, max_num_seqs=max(batches),
              enable_prefix_caching=False, max_num_batched_tokens=max(512, max(batches)), **extra)
    print(f"start-up {time.perf_counter() - t0:.1f} s", flush=True)
    runner = llm.engine.runner
    compiled = getattr(runner, "compiled_forward", None)
    rows = []
    for b in batches:
        for mode in ("eager", "compiled") if compiled is not None else ("eager",):
            runner.compiled_forward = compiled if mode == "compiled" else None
            rows.append({"mode": mode, **measure(llm.engine, b, args.steps, args.prompt_len)})
        runner.compiled_forward = compiled
    path = resolve_model_path(args.model)
    baseline = {b: None if args.no_llama_cpp or not path.endswith(".gguf") else
                llama_cpp_decode(path, b, args.steps, args.prompt_len) for b in batches}
    for row in rows:
        row["llama_cpp_tok_s"] = baseline[row["batch"]]
    header = (f"{datetime.date.today()}  {cpu_name()}  dispatch {dispatch()}  {torch.get_num_threads()} threads  "
              f"torch {torch.__version__}  quantization={args.quantization} {extra or ''}")
    print("\n" + header)
    print("| batch | mode | step ms | tok/s | llama.cpp tok/s | ratio | forward ms | head ms | sampler ms | matmul ms "
          "| non-matmul ms | engine ms | ops/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lc = r["llama_cpp_tok_s"]
        lc_text, ratio = ("-", "-") if lc is None else (f"{lc:.1f}", f"{r['tok_s'] / lc:.2f}x")
        print(f"| {r['batch']} | {r['mode']} | {r['step_ms']:.2f} | {r['tok_s']:.1f} | {lc_text} | "
              f"{ratio} | {r['forward_ms']:.2f} | {r['head_ms']:.2f} | "
              f"{r['sampler_ms']:.2f} | {r['matmul_ms']:.2f} | {r['non_matmul_ms']:.2f} | {r['engine_ms']:.2f} | "
              f"{r['ops_per_step']:.0f} |")
    for r in rows:
        print(f"\nbatch {r['batch']} {r['mode']}: top ops by self time per step")
        for name, count, ms in r["top_ops"]:
            print(f"  {name:48s} {count:6.0f} calls {ms:7.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
