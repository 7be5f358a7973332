"""Perplexity of roofline's weight formats on an English text, fp32 as the baseline in the same run.

    python bench/perplexity.py [--model default] [--modes none,int8,int4,auto] [--window 512]
                               [--text bench/data/prose.txt] [--group-size 32] [--kv-cache-dtype auto]
                               [--chunk 512]

The text (bench/data/prose.txt, ~6.5 KB) is original prose written for this benchmark. It is split
into windows of `--window` tokens; each window is scored through the public API (prompt logprobs of
the actual next tokens, computed from the raw model distribution), and perplexity is
exp(-mean logprob) over all scored tokens. Modes are `quantization=` values: "none" is fp32,
"auto" is the GGUF file's own precision (Q4_1 -> int4 g32 for the default model). A window is
prefilled in chunks of `--chunk` tokens; only chunks after the first read K/V back from the cache, so
measure `--kv-cache-dtype int8` with a chunk smaller than the window.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import time

import torch

DEFAULT_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "prose.txt")


def perplexity(llm, windows: list[list[int]]) -> tuple[float, int]:
    """(perplexity, number of scored tokens) of `llm` over token windows."""
    from roofline import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    total, count = 0.0, 0
    for out in llm.generate(windows, params):
        for entry, token in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:]):  # the first has no context
            total += entry[token].logprob
            count += 1
    return math.exp(-total / count), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--modes", default="none,int8,int4,auto", help="comma-separated quantization modes")
    parser.add_argument("--group-size", type=int, default=32, help="int4 group size")
    parser.add_argument("--window", type=int, default=512, help="tokens per scored window")
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"])
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk (max_num_batched_tokens)")
    args = parser.parse_args()

    from roofline import LLM

    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    rows = []
    base = None
    for mode in args.modes.split(","):
        t0 = time.perf_counter()
        llm = LLM(args.model, quantization=mode, quantization_group_size=args.group_size, dtype="float32",
                  kv_cache_memory=256 << 20, kv_cache_dtype=args.kv_cache_dtype, max_num_batched_tokens=args.chunk)
        ids = llm.tokenizer.encode(text)
        windows = [ids[i:i + args.window] for i in range(0, len(ids), args.window)]
        windows = [w for w in windows if len(w) > 1]
        ppl, count = perplexity(llm, windows)
        base = ppl if mode == "none" else base
        rows.append((mode, llm.engine.runner.weight_bytes, ppl, count, time.perf_counter() - t0))
        del llm

    print(f"\n{datetime.date.today()}  {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"model {args.model}, text {os.path.basename(args.text)} ({len(text)} chars), "
          f"windows of {args.window} tokens, int4 group {args.group_size}, KV cache {args.kv_cache_dtype}, "
          f"chunks of {args.chunk}\n")
    print("| mode | weights MiB | perplexity | vs fp32 | tokens | seconds |")
    print("|---|---|---|---|---|---|")
    for mode, nbytes, ppl, count, secs in rows:
        rel = f"{(ppl / base - 1) * 100:+.2f}%" if base else "-"
        print(f"| {'fp32' if mode == 'none' else mode} | {nbytes / 2**20:.1f} | {ppl:.4f} | {rel} | {count} | "
              f"{secs:.0f} |")


if __name__ == "__main__":
    main()
