"""Measured kernel choice (`kernels="auto"`) against the built-in rule (`kernels="default"`), same run.

    python bench/kernel_choice.py [--threads 2] [--gen-len 64] [--batch 1,32]
    ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 python bench/kernel_choice.py   # AVX2 dispatch

Per batch size B: B prompts of 32 tokens, greedy, `gen_len` tokens each; reports decode tokens/s
(all sequences) for each mode, the median of --repeats, and auto / default. Prefill: one 256-token
prompt, tokens/s. Each mode runs in its own fresh process (a second engine in one process measured
prefill ~25% slower than the first, whichever mode it ran), the modes alternating over --rounds.
Prints one table and the CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import platform
import statistics
import time

import torch


def run(mode: str, batches: list[int], gen_len: int, repeats: int) -> dict[str, float]:
    from roofline import LLM, SamplingParams

    llm = LLM("default", kv_cache_memory=256 << 20, kernels=mode)
    out: dict[str, float] = {}
    g = torch.Generator().manual_seed(0)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True)
    llm.generate([[11] * 8], full)  # warm-up
    for b in batches:
        rates = []
        for _ in range(repeats):
            prompts = torch.randint(10, 40000, (b, 32), generator=g).tolist()
            t0 = time.perf_counter()
            llm.generate(prompts, one)
            t_prefill = time.perf_counter() - t0
            prompts = torch.randint(10, 40000, (b, 32), generator=g).tolist()
            t0 = time.perf_counter()
            llm.generate(prompts, full)
            rates.append(b * (gen_len - 1) / (time.perf_counter() - t0 - t_prefill))
        out[f"decode B={b}"] = statistics.median(rates)
    rates = []
    for _ in range(repeats):
        prompt = torch.randint(10, 40000, (256,), generator=g).tolist()
        t0 = time.perf_counter()
        llm.generate([prompt], one)
        rates.append(256 / (time.perf_counter() - t0))
    out["prefill 256"] = statistics.median(rates)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="processes per mode, alternating; best kept")
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # internal: one mode, JSON out
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["ROOFLINE_NUM_THREADS"] = str(args.threads)
    batches = [int(b) for b in args.batch.split(",")]
    if args.mode:
        print(json.dumps(run(args.mode, batches, args.gen_len, args.repeats)))
        return
    results: dict[str, list[dict[str, float]]] = {"default": [], "auto": []}
    for _ in range(args.rounds):
        for mode in results:
            cmd = [sys.executable, __file__, "--mode", mode, "--threads", str(args.threads), "--gen-len",
                   str(args.gen_len), "--batch", args.batch, "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1]))
    base, auto = ({case: max(r[case] for r in runs) for case in runs[0]} for runs in results.values())
    from roofline.kernels import machine_key

    print(f"{datetime.date.today()}  {machine_key().describe()}  ({platform.machine()})")
    print("| case | kernels=default tok/s | kernels=auto tok/s | auto / default |")
    print("|---|---|---|---|")
    for case in base:
        print(f"| {case} | {base[case]:.1f} | {auto[case]:.1f} | {auto[case] / base[case]:.2f}x |")


if __name__ == "__main__":
    main()
