"""Prefill and batch-1 decode speed of roofline against Hugging Face transformers, same weights, same run.

    python bench/generate.py [--model default] [--prompt-len 128] [--gen-len 128] [--repeats 3]

Prints one table with tokens/s, the ratio to transformers, and the fraction of the memory-bandwidth
ceiling for batch-1 decode (weight bytes read per token / bandwidth measured in this process).
Optional baseline: llama.cpp (llama-cpp-python) on the same GGUF, when installed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch


def measure_bandwidth(num_bytes: int = 1 << 29) -> dict[str, float]:
    """Read bandwidth (sum over a large fp32 tensor) and fp32 GEMV bandwidth, in bytes/s."""
    x = torch.rand(num_bytes // 4)
    x.sum()
    t = time.perf_counter()
    for _ in range(5):
        x.sum()
    read = 5 * num_bytes / (time.perf_counter() - t)
    w = x.view(-1, 4096)
    v = torch.rand(4096)
    torch.mv(w, v)
    t = time.perf_counter()
    for _ in range(5):
        torch.mv(w, v)
    gemv = 5 * num_bytes / (time.perf_counter() - t)
    return {"read": read, "gemv": gemv}


def bench_roofline(model: str, prompt: list[int], gen_len: int, repeats: int, **llm_kwargs) -> dict:
    from roofline import LLM, SamplingParams

    llm = LLM(model, kv_cache_memory=256 << 20, **llm_kwargs)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True)
    llm.generate([prompt], full)  # warm-up
    prefill, total = [], []
    for i in range(repeats):
        p = [(t + i) % 1000 + 10 for t in prompt]  # fresh tokens: no prefix-cache hits
        t0 = time.perf_counter()
        llm.generate([p], one)
        prefill.append(time.perf_counter() - t0)
        p = [(t + i + 500) % 1000 + 10 for t in prompt]
        t0 = time.perf_counter()
        llm.generate([p], full)
        total.append(time.perf_counter() - t0)
    t_prefill, t_total = statistics.median(prefill), statistics.median(total)
    return {"prefill_tps": len(prompt) / t_prefill, "decode_tps": (gen_len - 1) / (t_total - t_prefill),
            "weight_bytes": llm.engine.runner.weight_bytes}


def bench_transformers(model_path: str, prompt: list[int], gen_len: int, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    directory, name = os.path.split(model_path)
    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    kwargs = dict(do_sample=False, max_new_tokens=gen_len, min_new_tokens=gen_len, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(ids, **kwargs)
        prefill, total = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            hf(ids)
            prefill.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            hf.generate(ids, **kwargs)
            total.append(time.perf_counter() - t0)
    t_prefill, t_total = statistics.median(prefill), statistics.median(total)
    return {"prefill_tps": len(prompt) / t_prefill, "decode_tps": (gen_len - 1) / (t_total - t_prefill)}


def bench_llama_cpp(model_path: str, prompt: list[int], gen_len: int, repeats: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python is not installed: llama.cpp baseline skipped (pip install llama-cpp-python)")
        return None
    llm = Llama(model_path, n_ctx=2048, n_threads=torch.get_num_threads(), verbose=False)
    prefill, total = [], []
    for _ in range(repeats + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        prefill.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(gen_len - 1):
            token = llm.sample(temp=0.0)
            llm.eval([token])
        total.append(time.perf_counter() - t0)
    return {"prefill_tps": len(prompt) / statistics.median(prefill[1:]),
            "decode_tps": (gen_len - 1) / statistics.median(total[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="fp32",
                        help="comma-separated roofline weight modes: fp32, int8, int4, gguf (the file's own)")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()

    from roofline.loaders import resolve_model_path

    path = resolve_model_path(args.model)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, 1000, (args.prompt_len,), generator=g).tolist()
    bw = measure_bandwidth()
    rows = []
    quantization = {"fp32": "none", "int8": "int8", "int4": "int4", "gguf": "auto"}
    for mode in args.modes.split(","):
        if mode not in quantization:
            parser.error(f"unknown mode {mode!r}; choose from {', '.join(quantization)}")
        r = bench_roofline(args.model, prompt, args.gen_len, args.repeats, dtype="float32",
                           quantization=quantization[mode])
        rows.append((f"roofline {mode}", r))
    base = None if args.skip_transformers else bench_transformers(path, prompt, args.gen_len, args.repeats)
    if base:
        rows.append(("transformers fp32", base))
    lcpp = bench_llama_cpp(path, prompt, args.gen_len, args.repeats) if path.endswith(".gguf") else None
    if lcpp:
        rows.append(("llama.cpp (GGUF)", lcpp))

    print(f"\n{datetime.date.today()}  {platform.processor() or platform.machine()}  "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"measured bandwidth: read {bw['read'] / 1e9:.1f} GB/s, fp32 GEMV {bw['gemv'] / 1e9:.1f} GB/s")
    print(f"prompt {args.prompt_len} tokens, {args.gen_len} generated, median of {args.repeats}\n")
    print(f"| engine | prefill tok/s | decode tok/s | decode vs transformers | decode / GEMV ceiling |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        ratio = f"{r['decode_tps'] / base['decode_tps']:.2f}x" if base else "-"
        ceiling = "-"
        if "weight_bytes" in r:
            ceil_tps = bw["gemv"] / r["weight_bytes"]
            ceiling = f"{r['decode_tps'] / ceil_tps:.0%} of {ceil_tps:.1f}"
        print(f"| {name} | {r['prefill_tps']:.0f} | {r['decode_tps']:.1f} | {ratio} | {ceiling} |")


if __name__ == "__main__":
    main()
