"""Offload (issue 12 item 5): a model ~3x the memory limit, run with roofline's streaming executor and with
transformers + accelerate (device_map="auto", max_memory, offload_folder), in one run.

    python bench/offload.py [--limit 330MB] [--layers 15] [--batch 4] [--new-tokens 8] [--placements auto,w=0/100/0]
        [--skip-accelerate]

A random-weight Llama-family checkpoint (hidden 1024, MLP 4096, GQA 16:4, vocab 8192; about 1 GB of fp32
safetensors, one shard per layer, written layer by layer so this process never holds it) goes to a temp
dir. `roofline calibrate --quick` measures this machine into a temp profile, so the planner's prediction
uses local rates. Each configuration then runs in its own process: it loads the model under the limit,
generates `new-tokens` greedy tokens for `batch` prompts of 32 tokens (eos ignored), and reports output
tok/s over the whole generate call (prefill included; the same count for both systems), the planner's
predicted rate, and RssAnon (from /proc/self/status, sampled every 5 ms) above the process's RssAnon
before the model was opened (the interpreter and torch: the stated slack). Benchmarks never assert.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

PROMPT_LEN = 32
SHAPE = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_key_value_heads=4,
             vocab_size=8192, max_position_embeddings=2048)


def rss_anon() -> int:
    """This process's anonymous resident memory in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """Samples RssAnon on a thread; `peak` is the largest value seen."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.peak, self._stop, self.interval_s = rss_anon(), threading.Event(), interval_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(self.interval_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_anon())


def write_checkpoint(path: str, num_layers: int) -> int:
    """A random Llama checkpoint, one safetensors shard per layer; returns the weight bytes."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from conftest import write_tiny_tokenizer

    h, i, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    kv = h // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    weight_map, total = {}, 0
    shards = [("embed", {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": torch.ones(h),
                         "lm_head.weight": rand(v, h)})]
    for n in range(num_layers):
        p = f"model.layers.{n}."
        shards.append((f"layer{n}", {
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
            p + "mlp.down_proj.weight": rand(h, i), p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h)}))
    for name, tensors in shards:  # one shard at a time: at most one layer in memory
        file = f"model-{name}.safetensors"
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * 4 for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=num_layers,
                  rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="float32",
                  bos_token_id=1, eos_token_id=2, hidden_act="silu", **SHAPE)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    write_tiny_tokenizer(path, SHAPE["vocab_size"])
    return total


def prompts(batch: int) -> list[list[int]]:
    """`batch` distinct prompts of PROMPT_LEN token ids."""
    return [[5 + (b * 131 + t * 17) % 8000 for t in range(PROMPT_LEN)] for b in range(batch)]


def worker_roofline(args: argparse.Namespace) -> dict:
    import torch  # noqa: F401  (imported before the baseline so the slack includes it)

    from roofline import LLM, SamplingParams

    base = rss_anon()
    sampler = PeakSampler()
    llm = LLM(args.model, memory_limit=args.limit, offload=args.placement, max_model_len=256,
              max_num_seqs=args.batch, swap_space=0, offload_dir=args.offload_dir)
    plan = llm.engine.runner.offload_plan
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts(1), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    out = llm.generate(prompts(args.batch), params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in out)
    peak = sampler.stop()
    streamer = llm.engine.runner.streamer
    predicted = None
    if plan is not None:  # the planner's rate for this run's own workload and batch (the start-up line's is
        # for the engine's default workload at the planner's batch)
        from roofline.offload.plan import predict_placement
        from roofline.planner.formats import get_weight_format
        from roofline.planner.layout import Workload

        predicted = predict_placement(llm.engine.model_config, get_weight_format("fp32"), plan.placement,
                                      int(args.limit), False, Workload(PROMPT_LEN, args.new_tokens), args.batch)
    return {"system": "roofline", "placement": plan.placement.describe() if plan else "none",
            "predicted_tok_s": predicted, "tok_s": tokens / elapsed,
            "tokens": tokens, "seconds": elapsed, "base_anon": base, "peak_anon_above_base": peak - base,
            "fetch_wait_s": streamer.wait_s if streamer else 0.0, "hardware": plan.hardware if plan else ""}


def worker_accelerate(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    base = rss_anon()
    sampler = PeakSampler()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, device_map="auto", max_memory={"cpu": int(args.limit)}, offload_folder=args.offload_dir,
        torch_dtype=torch.float32)
    ids = torch.tensor(prompts(args.batch))
    with torch.inference_mode():
        model.generate(ids[:1], max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, do_sample=False)
        elapsed = time.perf_counter() - start
    tokens = (out.shape[1] - ids.shape[1]) * args.batch
    peak = sampler.stop()
    devices = sorted(set(str(d) for d in model.hf_device_map.values()))
    return {"system": "transformers+accelerate", "placement": "device_map auto: " + ",".join(devices),
            "predicted_tok_s": None, "tok_s": tokens / elapsed, "tokens": tokens, "seconds": elapsed,
            "base_anon": base, "peak_anon_above_base": peak - base, "fetch_wait_s": None, "hardware": ""}


def run_worker(kind: str, args: argparse.Namespace, model: str, env: dict, extra: list[str]) -> dict:
    offload_dir = tempfile.mkdtemp(prefix="offload-bench-")
    cmd = [sys.executable, __file__, "--worker", kind, "--model", model, "--limit", str(args.limit),
           "--batch", str(args.batch), "--new-tokens", str(args.new_tokens), "--offload-dir", offload_dir, *extra]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        return {"system": kind, "error": f"over {args.timeout_s} s"}
    finally:
        shutil.rmtree(offload_dir, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"system": kind, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", default="330MB")
    parser.add_argument("--layers", type=int, default=15)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--placements", default="auto,w=0/100/0,w=7/0/93")
    parser.add_argument("--timeout-s", type=int, default=120)
    parser.add_argument("--skip-accelerate", action="store_true", help="roofline rows only")
    parser.add_argument("--worker", choices=["roofline", "accelerate"])
    parser.add_argument("--model")
    parser.add_argument("--placement", default="auto")
    parser.add_argument("--offload-dir")
    args = parser.parse_args()
    if args.worker:
        result = worker_roofline(args) if args.worker == "roofline" else worker_accelerate(args)
        print(json.dumps(result))
        return
    from roofline.planner.units import parse_quantity

    limit = int(parse_quantity(args.limit, "--limit"))
    args.limit = limit
    work = tempfile.mkdtemp(prefix="offload-model-")
    cache = os.path.join(work, "cache")
    env = {**os.environ, "ROOFLINE_CACHE_DIR": cache, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    try:
        model = os.path.join(work, "model")
        os.makedirs(model)
        weight_bytes = write_checkpoint(model, args.layers)
        subprocess.run([sys.executable, "-m", "roofline.cli", "calibrate", "--quick"], env=env, check=True,
                       capture_output=True)
        rows = [run_worker("roofline", args, model, env, ["--placement", p]) for p in args.placements.split(",")]
        if not args.skip_accelerate:
            rows.append(run_worker("accelerate", args, model, env, []))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"# offload bench {datetime.date.today()} on {cpu} ({os.cpu_count()} cores), {platform.python_version()}")
    print(f"# model: {args.layers} layers, {weight_bytes / 1e9:.2f} GB fp32; limit {limit / 1e6:.0f} MB "
          f"({weight_bytes / limit:.1f}x); batch {args.batch} x {args.new_tokens} new tokens, prompts {PROMPT_LEN}")
    accel = next((r["tok_s"] for r in rows if r.get("system") == "transformers+accelerate" and "tok_s" in r), None)
    print("| system | placement | tok/s | predicted | measured/predicted | vs accelerate | RssAnon above base | base |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['system']} | error: {r['error']} | | | | | | |")
            continue
        pred = r["predicted_tok_s"]
        ratio = f"{r['tok_s'] / pred:.2f}" if pred else "-"
        vs = f"{r['tok_s'] / accel:.1f}x" if accel else "-"
        print(f"| {r['system']} | {r['placement']} | {r['tok_s']:.2f} | {f'{pred:.2f}' if pred else '-'} | {ratio} | "
              f"{vs} | {r['peak_anon_above_base'] / 1e6:.0f} MB | {r['base_anon'] / 1e6:.0f} MB |")


if __name__ == "__main__":
    main()
