"""The planner's predictions against the runtime's measured rates, on the default model.

    python bench/plan_vs_measured.py [--model default] [--hardware local] [--batches 1,4,16,64]
                                     [--prompt-len 128] [--gen-len 32] [--quantization none]

Needs a calibration profile for `--hardware local` (`roofline calibrate`). For each batch size it
measures prefill tok/s (all prompts prefilled together, one engine step per `max_num_batched_tokens`)
and decode tok/s (decode-only steps), and prints them beside the planner's prediction with the
relative error. Run it alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch

from roofline import LLM, SamplingParams
from roofline.planner import load_hardware, load_model_spec, predict_rates


def measure(llm: LLM, batch: int, prompt_len: int, gen_len: int, seed: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of `batch` random prompts run together."""
    engine = llm.engine
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(10, 40000, (batch, prompt_len), generator=g).tolist()
    params = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"b{batch}-{seed}-{i}", p, params)
    prefill_time = decode_time = 0.0
    decode_tokens = 0
    while engine.has_unfinished_requests():
        is_prefill = bool(engine.scheduler.waiting) or any(
            r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running)
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        if is_prefill:
            prefill_time += dt
        else:
            decode_time += dt
            decode_tokens += len(outs)
    return batch * prompt_len / prefill_time, decode_tokens / decode_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--hardware", default="local")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--quantization", default="none", help="runtime quantization (none = fp32 weights)")
    parser.add_argument("--weight-format", default="fp32", help="the planner's weight format for that mode")
    args = parser.parse_args()

    batches = [int(b) for b in args.batches.split(",")]
    spec = load_model_spec(args.model)
    hw = load_hardware(args.hardware)
    llm = LLM(args.model, dtype="float32", quantization=args.quantization, max_num_seqs=max(batches),
              max_num_batched_tokens=512, kv_cache_memory=1 << 30, enable_prefix_caching=False)
    measure(llm, 1, 16, 4, seed=99)  # warm-up
    rows = []
    for b in batches:
        prefill, decode = measure(llm, b, args.prompt_len, args.gen_len, seed=b)
        pred = predict_rates(spec, hw, b, args.prompt_len, weight_format=args.weight_format,
                             decode_context=args.prompt_len + args.gen_len / 2)
        rows.append((b, pred, prefill, decode))
    print(f"\n{datetime.date.today()}  {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; hardware profile: {args.hardware}; model {args.model} "
          f"({args.quantization}); prompt {args.prompt_len}, {args.gen_len} generated\n")
    print("| batch | prefill predicted | prefill measured | error | decode predicted | decode measured | error "
          "| decode bound |")
    print("|---|---|---|---|---|---|---|---|")
    for b, pred, prefill, decode in rows:
        e_p = pred.prefill_tok_s / prefill - 1
        e_d = pred.decode_tok_s / decode - 1
        print(f"| {b} | {pred.prefill_tok_s:.0f} | {prefill:.0f} | {e_p:+.0%} | {pred.decode_tok_s:.1f} | "
              f"{decode:.1f} | {e_d:+.0%} | {pred.decode_bound} |")


if __name__ == "__main__":
    main()
