"""Offline throughput: roofline's continuous batching against transformers static batching and
llama.cpp batched decode, same weights, same run.

    python bench/throughput.py [--model default] [--num-prompts 64] [--prompt-len 128] [--gen-len 128]
                               [--concurrency 1,8,32,64] [--max-prompts-at-1 8]

Per concurrency c, every engine runs the prompts with at most c sequences in flight and reports
total tokens/s ((prompt + generated) / wall time), generated tokens/s, and decode tokens/s (tokens
generated in decode-only steps / time of those steps). Prints one table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch


def make_prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 40000, (n, length), generator=g).tolist()


def bench_roofline(model: str, prompts: list[list[int]], gen_len: int, concurrency: int, **kwargs) -> dict:
    from roofline import LLM, SamplingParams

    llm = LLM(model, max_num_seqs=concurrency, kv_cache_memory=2 << 30, enable_prefix_caching=False,
              max_num_batched_tokens=max(512, concurrency), **kwargs)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    decode_time = 0.0
    decode_tokens = 0
    generated = 0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        plan_prefill = any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) \
            or bool(engine.scheduler.waiting)
        ts = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - ts
        n = sum(1 for _ in outs)
        generated += n
        if not plan_prefill:
            decode_time += dt
            decode_tokens += n
    wall = time.perf_counter() - t0
    total = len(prompts) * (len(prompts[0]) + gen_len)
    return {"total_tps": total / wall, "gen_tps": len(prompts) * gen_len / wall,
            "decode_tps": decode_tokens / decode_time if decode_time else float("nan"), "wall": wall}


def bench_transformers(path: str, prompts: list[list[int]], gen_len: int, concurrency: int) -> dict:
    from transformers import AutoModelForCausalLM

    directory, name = os.path.split(path)
    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    kwargs = dict(do_sample=False, max_new_tokens=gen_len, min_new_tokens=gen_len, pad_token_id=0)
    generate_time = decode_time = 0.0
    with torch.inference_mode():
        hf.generate(torch.tensor(prompts[:1]), **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        for start in range(0, len(prompts), concurrency):
            ids = torch.tensor(prompts[start:start + concurrency])
            ts = time.perf_counter()
            hf(ids)  # the prefill alone, timed separately to split decode time out of generate()
            prefill = time.perf_counter() - ts
            ts = time.perf_counter()
            hf.generate(ids, **kwargs)
            took = time.perf_counter() - ts
            generate_time += took
            decode_time += took - prefill
    total = len(prompts) * (len(prompts[0]) + gen_len)
    return {"total_tps": total / generate_time, "gen_tps": len(prompts) * gen_len / generate_time,
            "decode_tps": len(prompts) * (gen_len - 1) / decode_time, "wall": generate_time}


def bench_llama_cpp(path: str, prompts: list[list[int]], gen_len: int, concurrency: int) -> dict | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    from llama_cpp_batch import run_batched  # next to this script

    return run_batched(llama_cpp, path, prompts, gen_len, concurrency, torch.get_num_threads())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--max-prompts-at-1", type=int, default=8,
                        help="prompts run at concurrency 1 (the full set takes minutes per engine)")
    parser.add_argument("--engines", default="roofline,transformers,llama.cpp")
    parser.add_argument("--modes", default="none,auto",
                        help="roofline quantization modes: none (fp32 weights), auto (the GGUF's own Q4_1 as int4), int8")
    args = parser.parse_args()

    from roofline.loaders import resolve_model_path

    path = resolve_model_path(args.model)
    engines = args.engines.split(",")
    rows = []
    for c in [int(x) for x in args.concurrency.split(",")]:
        n = args.num_prompts if c > 1 else min(args.num_prompts, args.max_prompts_at_1)
        prompts = make_prompts(n, args.prompt_len)
        for mode in args.modes.split(",") if "roofline" in engines else []:
            rows.append((c, n, f"roofline {mode}", bench_roofline(args.model, prompts, args.gen_len, c,
                                                                  dtype="float32", quantization=mode)))
        if "transformers" in engines:
            rows.append((c, n, "transformers fp32 (static batch)",
                         bench_transformers(path, prompts, args.gen_len, c)))
        if "llama.cpp" in engines:
            r = bench_llama_cpp(path, prompts, args.gen_len, c) if path.endswith(".gguf") else None
            if r is None:
                print("llama.cpp baseline skipped: llama-cpp-python is not installed")
            else:
                rows.append((c, n, "llama.cpp (GGUF)", r))
        for row in rows[-(len(args.modes.split(',')) + 2):]:
            print(row, flush=True)
    print(f"\n{datetime.date.today()}  {platform.machine()}  {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; prompts of {args.prompt_len} tokens, {args.gen_len} generated each\n")
    print("| concurrency | prompts | engine | total tok/s | generated tok/s | decode tok/s |")
    print("|---|---|---|---|---|---|")
    for c, n, name, r in rows:
        print(f"| {c} | {n} | {name} | {r['total_tps']:.0f} | {r['gen_tps']:.1f} | {r['decode_tps']:.1f} |")


if __name__ == "__main__":
    main()
