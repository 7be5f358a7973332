"""The planner's predictions against the runtime's measured rates, on the default model.

    python bench/plan_vs_measured.py [--model default] [--hardware local | --calibrate]
                                     [--batches 1,4,16,64] [--prompt-len 128] [--decode-steps 8]
                                     [--repeats 3] [--modes none,auto]

Each mode is the runtime's `quantization` setting; the planner prices it as the weight format the
runtime then runs: none -> fp32, int8 -> int8, int4 -> int4, auto -> the checkpoint's own format
(the default GGUF's Q4_1 layers run as int4, its Q8_0 head as int8).

For each batch size B it measures, with the engine's own step loop:
- prefill: B random prompts with max_tokens=1, so every step is prefill only (chunks of
  max_num_batched_tokens); rate = B x prompt_len / total step time.
- decode: B requests prefilled first (steps until none is waiting or mid-prompt), then
  `--decode-steps` steps in which exactly B sequences decode one token each; rate = B / step
  time, at the mean context those steps attended (passed to the planner).
The batch sizes are swept `--repeats` times, round after round (fresh prompts each run), and the
error is taken against the best prefill run and the best decode step of each batch size, as
calibrate keeps the best of its repeats: on a shared machine the best run is the one least
disturbed by neighbours. The medians are printed beside them, to show the noise.

`--calibrate` measures the machine in this process before each mode (as `roofline calibrate`, not
saved), so the profile and the measurements see the same machine state; otherwise `--hardware
local` reads the saved profile. Run it alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from roofline import LLM, SamplingParams
from roofline.planner import get_weight_format, load_hardware, load_model_spec, predict_rates
from roofline.calibrate.run import calibrate

VOCAB_LOW, VOCAB_HIGH = 10, 40000  # random prompt token ids, clear of special tokens


@dataclass
class Measured:
    """One batch size's prefill and decode rates (best and median), and the context decode attended."""

    prefill_tok_s: float  # best run
    prefill_median_tok_s: float
    decode_tok_s: float  # best step
    decode_median_tok_s: float
    decode_context: float


def _prompts(batch: int, prompt_len: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(VOCAB_LOW, VOCAB_HIGH, (batch, prompt_len), generator=g).tolist()


def _is_prefilling(engine) -> bool:
    return bool(engine.scheduler.waiting) or any(
        r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running)


def measure_prefill(llm: LLM, batch: int, prompt_len: int, seed: int) -> float:
    """Prompt tok/s of `batch` prompts prefilled together (max_tokens=1: no decode step runs)."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for i, prompt in enumerate(_prompts(batch, prompt_len, seed)):
        engine.add_request(f"p{seed}-{i}", prompt, params)
    begin = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return batch * prompt_len / (time.perf_counter() - begin)


def measure_decode(llm: LLM, batch: int, prompt_len: int, num_steps: int, seed: int) -> tuple[list[float], float]:
    """(seconds of each of `num_steps` decode steps with exactly `batch` sequences running, mean context)."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=10 * num_steps + prompt_len, ignore_eos=True)
    ids = [f"d{seed}-{i}" for i in range(batch)]
    for rid, prompt in zip(ids, _prompts(batch, prompt_len, seed)):
        engine.add_request(rid, prompt, params)
    while _is_prefilling(engine):
        engine.step()
    running = engine.scheduler.running
    if len(running) != batch:
        raise RuntimeError(f"{len(running)} sequences running, not {batch}: raise max_num_seqs or the KV budget")
    # Each step attends the tokens cached so far plus the new one: num_tokens before the step.
    contexts, seconds = [], []
    for _ in range(num_steps):
        contexts.append(sum(r.num_tokens for r in running) / batch)
        begin = time.perf_counter()
        engine.step()
        seconds.append(time.perf_counter() - begin)
    engine.abort(ids)
    return seconds, sum(contexts) / len(contexts)


def measure_round(llm: LLM, batch: int, prompt_len: int, num_steps: int, seed: int) -> tuple[float, list[float], float]:
    """One run at `batch`: (prefill tok/s, decode step seconds, decode context)."""
    prefill = measure_prefill(llm, batch, prompt_len, seed=1000 * batch + seed)
    steps, context = measure_decode(llm, batch, prompt_len, num_steps, seed=2000 * batch + seed)
    return prefill, steps, context


def measure_all(llm: LLM, batches: list[int], prompt_len: int, num_steps: int, repeats: int) -> dict[int, Measured]:
    """Every batch size `repeats` times, round after round: a slow spell of the machine (seconds long
    on a shared host) then spoils one run of a batch size, not all of them."""
    runs: dict[int, list[tuple[float, list[float], float]]] = {b: [] for b in batches}
    for r in range(repeats):
        for b in batches:
            runs[b].append(measure_round(llm, b, prompt_len, num_steps, seed=r))
    result = {}
    for b, items in runs.items():
        prefills = [p for p, _, _ in items]
        steps = [t for _, seconds, _ in items for t in seconds]
        result[b] = Measured(max(prefills), statistics.median(prefills), b / min(steps),
                             b / statistics.median(steps), statistics.mean(c for _, _, c in items))
    return result


def planner_format(spec, mode: str):
    """The planner's weight format for a runtime quantization mode."""
    if mode == "auto":
        return spec.native_format or get_weight_format("fp32")
    return get_weight_format({"none": "fp32"}.get(mode, mode))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--hardware", default="local")
    parser.add_argument("--calibrate", action="store_true",
                        help="measure the machine in this process first instead of reading --hardware")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="none,auto", help="runtime quantization modes, comma-separated")
    args = parser.parse_args()

    batches = [int(b) for b in args.batches.split(",")]
    spec = load_model_spec(args.model)
    source = "calibrated in this process before each mode" if args.calibrate else f"profile {args.hardware}"
    rows = []
    for mode in args.modes.split(","):
        # The machine's speed drifts on a shared host: calibrating right before each mode keeps the two close.
        hw = calibrate().to_hardware() if args.calibrate else load_hardware(args.hardware)
        llm = LLM(args.model, dtype="float32", quantization=mode, max_num_seqs=max(batches),
                  max_num_batched_tokens=512, kv_cache_memory=1 << 30, enable_prefix_caching=False)
        fmt = planner_format(spec, mode)
        measure_round(llm, 1, 16, 2, seed=99)  # warm-up
        for b, got in measure_all(llm, batches, args.prompt_len, args.decode_steps, args.repeats).items():
            pred = predict_rates(spec, hw, b, args.prompt_len, weight_format=fmt, decode_context=got.decode_context)
            rows.append((f"{mode} ({fmt.name})", b, pred, got))
        del llm
    print(f"\n{datetime.date.today()}  {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; hardware: {source}; model {args.model}; "
          f"prompt {args.prompt_len}, {args.decode_steps} decode steps, best of {args.repeats}\n")
    print("| mode | batch | prefill predicted | prefill measured best (median) | error | decode context "
          "| decode predicted | decode measured best (median) | error | decode step's largest term |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, b, pred, got in rows:
        e_p = pred.prefill_tok_s / got.prefill_tok_s - 1
        e_d = pred.decode_tok_s / got.decode_tok_s - 1
        term, share = pred.decode_term
        print(f"| {mode} | {b} | {pred.prefill_tok_s:.0f} | {got.prefill_tok_s:.0f} ({got.prefill_median_tok_s:.0f}) "
              f"| {e_p:+.0%} | {got.decode_context:.0f} | {pred.decode_tok_s:.1f} | {got.decode_tok_s:.1f} "
              f"({got.decode_median_tok_s:.1f}) | {e_d:+.0%} | {term} {share:.0%} |")


if __name__ == "__main__":
    main()
