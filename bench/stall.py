"""How long a running stream waits for its next token while a long prompt, or an echo request with
prompt logprobs, is prefilled — with prompt chunks sized by max_decode_stall_ms and, as the baseline in
the same run, with whole-budget chunks (max_decode_stall_ms=None).

    python bench/stall.py [--model default] [--prompt-len 2000] [--stall-ms 250] [--threads 2]

For each setting and each intruder (plain prompt, echo + logprobs): a stream decodes; the intruder
arrives; the script records every gap between the stream's tokens until the intruder's first token, and
reports the longest gap, the intruder's time to first token, and the steps it took.
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch

from roofline.llm import LLM
from roofline.sampling_params import SamplingParams
from machine import cpu_name


def run(llm: LLM, prompt_len: int, echo: bool, seed: int) -> dict:
    engine = llm.engine
    engine.add_request("stream", [100 + i for i in range(16)], SamplingParams(max_tokens=480, ignore_eos=True,
                                                                            temperature=0))
    while not engine.step():
        pass
    for _ in range(4):
        engine.step()
    intruder = [(seed * 7919 + i * 104729) % 40000 + 100 for i in range(prompt_len)]
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1 if echo else None)
    arrived = last = time.perf_counter()
    engine.add_request("intruder", intruder, params)
    gaps, steps, ttft = [], 0, None
    while ttft is None:
        outputs = {o.request_id: o for o in engine.step()}
        steps += 1
        now = time.perf_counter()
        if "stream" in outputs:
            gaps.append(now - last)
            last = now
        if "intruder" in outputs:
            ttft = now - arrived
    engine.abort(["stream", "intruder"])
    return {"max_gap_s": max(gaps), "ttft_s": ttft, "steps": steps, "stream_tokens": len(gaps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--prompt-len", type=int, default=2000)
    p.add_argument("--stall-ms", type=float, default=250.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{datetime.date.today()} {cpu_name()}, {args.threads} threads, torch {torch.__version__}, "
          f"model {args.model}, intruder of {args.prompt_len} tokens")
    print("| chunks | intruder | longest stream gap s | intruder TTFT s | steps | stream tokens meanwhile |")
    print("|---|---|---|---|---|---|")
    for label, stall in ((f"max_decode_stall_ms={args.stall_ms:g}", args.stall_ms), ("whole budget (None)", None)):
        llm = LLM(args.model, max_model_len=args.prompt_len + 512, kv_cache_memory=256 << 20,
                  max_decode_stall_ms=stall, enable_prefix_caching=False)
        for i, echo in enumerate((False, True)):
            r = run(llm, args.prompt_len, echo, seed=i)
            print(f"| {label} | {'echo + logprobs' if echo else 'plain prompt'} | {r['max_gap_s']:.2f} | "
                  f"{r['ttft_s']:.2f} | {r['steps']} | {r['stream_tokens']} |", flush=True)


if __name__ == "__main__":
    main()
