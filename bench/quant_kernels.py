"""Candidate low-bit matmul kernels on this CPU, at the default model's linear shapes.

    python bench/quant_kernels.py [--threads 2] [--ms 1,32,128] [--seconds 0.3] [--model-loop]

Times y = x W^T for x [M, K] fp32 and each weight format, and prints one table of microseconds per
call and the speed-up over fp32 F.linear (the baseline, measured in the same run). Candidates:
fp32 F.linear; bf16 F.linear; weight-only int8 (`_weight_int8pack_mm`) and int4 group 32/64
(`_weight_int4pack_mm_for_cpu`), each with fp32 and with bf16 activations; dynamic int8
activations x int8 weights (`quantized.linear_dynamic` with fbgemm/onednn packed weights, and
`torch._int_mm` with activations quantized per token to one int8 digit, or to two as roofline's int8
path does). `--model-loop` instead times one decode token's 120 GEMVs back to back, out of cache.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from roofline.quant.linear import int8_activation_mm

# (name, K, N) of the default model (SmolLM2-135M): hidden 576, intermediate 1536, vocab 49152
SHAPES = [("o_proj", 576, 576), ("qkv_proj", 576, 960), ("gate_up_proj", 576, 3072),
          ("down_proj", 1536, 576), ("lm_head", 576, 49152)]


def timeit(fn, seconds: float) -> float:
    """Microseconds per call: the median over rounds of ~2 ms each, so a round the OS preempted counts once."""
    fn()
    t0 = time.perf_counter()
    fn()
    per_round = max(1, int(0.002 / max(time.perf_counter() - t0, 1e-7)))
    rounds: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(rounds) < 5:
        t0 = time.perf_counter()
        for _ in range(per_round):
            fn()
        rounds.append((time.perf_counter() - t0) / per_round * 1e6)
    return statistics.median(rounds)


def candidates(w: torch.Tensor) -> dict:
    """name -> callable(x) for every kernel this torch build offers."""
    N, K = w.shape
    out = {"fp32 F.linear": lambda x: F.linear(x, w)}
    scale = w.abs().amax(1).clamp_min(1e-8) / 127
    q8 = torch.round(w / scale[:, None]).to(torch.int8)
    out["int8 weight-only, fp32 x (_weight_int8pack_mm)"] = (
        lambda x: torch.ops.aten._weight_int8pack_mm(x, q8, scale))
    scale_bf16 = scale.bfloat16()
    out["int8 weight-only, bf16 x (_weight_int8pack_mm)"] = (
        lambda x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q8, scale_bf16).float())
    w_bf16 = w.bfloat16()
    out["bf16 F.linear (bf16 weights)"] = lambda x: F.linear(x.bfloat16(), w_bf16).float()
    for g in (32, 64):
        wg = w.reshape(N, K // g, g)
        lo, hi = wg.amin(-1), wg.amax(-1)
        s = ((hi - lo) / 15).clamp_min(1e-8)
        q4 = torch.round((wg - lo[..., None]) / s[..., None]).clamp(0, 15).reshape(N, K).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
        sz = torch.stack([s, lo + 8 * s], -1).transpose(0, 1).contiguous()  # [K/g, N, 2]
        if g == 32:
            out[f"int4 g{g} weight-only, fp32 x (_weight_int4pack_mm_for_cpu)"] = (
                lambda x, p=packed, g=g, sz=sz: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, g, sz))
        sz16 = sz.bfloat16()
        out[f"int4 g{g} weight-only, bf16 x (_weight_int4pack_mm_for_cpu)"] = (
            lambda x, p=packed, g=g, sz=sz16:
            torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), p, g, sz).float())
    for engine in ("fbgemm", "onednn"):
        if engine not in torch.backends.quantized.supported_engines:
            continue
        torch.backends.quantized.engine = engine
        qw = torch.quantize_per_channel(w, scale.double(), torch.zeros(N, dtype=torch.long), 0, torch.qint8)
        packed_dyn = torch.ops.quantized.linear_prepack(qw, None)

        def dyn(x, p=packed_dyn, e=engine):
            torch.backends.quantized.engine = e
            return torch.ops.quantized.linear_dynamic(x, p, True)
        out[f"int8 x int8 dynamic ({engine} linear_dynamic)"] = dyn
    def int_mm(x):
        xs = x.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
        return (torch._int_mm(torch.round(x / xs).to(torch.int8), q8.t()) * xs) * scale
    out["int8 x int8, 1 digit per token (_int_mm)"] = int_mm
    out["int8 x int8, 2 digits per token (roofline int8_activation_mm)"] = (
        lambda x: int8_activation_mm(x, q8, scale))
    return out


def model_loop(num_layers: int = 30, rounds: int = 10) -> None:
    """One decode token's 4 x 30 one-row GEMVs back to back, weights out of cache: ms and GB/s per kernel."""
    shapes = [(N, K) for _, K, N in SHAPES[:4]]
    x = {K: torch.randn(1, K).bfloat16() for _, K in shapes}
    xq = {K: torch.randint(-127, 128, (1, K), dtype=torch.int8) for _, K in shapes}
    int4, int8 = [], []
    for _ in range(num_layers):
        for N, K in shapes:
            q4 = torch.randint(0, 16, (N, K), dtype=torch.int32)
            int4.append((torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1),
                         torch.rand(K // 32, N, 2).bfloat16(), K))
            int8.append((torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N).bfloat16(), K))
    kernels = {
        "int4 g32 (_weight_int4pack_mm_for_cpu)": (
            lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(x[K], p, 32, sz) for p, sz, K in int4],
            sum(p.numel() + 2 * sz.numel() for p, sz, _ in int4)),
        "int8 (_weight_int8pack_mm)": (
            lambda: [torch.ops.aten._weight_int8pack_mm(x[K], q, s) for q, s, K in int8],
            sum(q.numel() for q, _, _ in int8)),
        "int8 x int8, 1 digit (_int_mm, no activation quantization)": (
            lambda: [torch._int_mm(xq[K], q.t()) for q, _, K in int8], sum(q.numel() for q, _, _ in int8)),
    }
    print(f"\none decode token's {len(int4)} linears, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}\n")
    print("| kernel | ms per token | GB/s |")
    print("|---|---|---|")
    for name, (fn, num_bytes) in kernels.items():
        fn()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        print(f"| {name} | {t * 1e3:.2f} | {num_bytes / t / 1e9:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--ms", default="1,32,128", help="comma-separated batch rows M")
    parser.add_argument("--seconds", type=float, default=0.3, help="time per measurement")
    parser.add_argument("--model-loop", action="store_true",
                        help="instead: a decode token's 120 GEMVs of the default model back to back")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model_loop:
        model_loop()
        return
    torch.manual_seed(0)
    ms = [int(m) for m in args.ms.split(",")]
    results: dict[tuple[str, str, int], float] = {}
    names: list[str] = []
    with torch.inference_mode():
        for shape, K, N in SHAPES:
            w = torch.randn(N, K) * 0.05
            kernels = candidates(w)
            names = list(kernels)
            for m in ms:
                x = torch.randn(m, K)
                for name, fn in kernels.items():
                    results[(shape, name, m)] = timeit(lambda: fn(x), args.seconds)
    load = os.getloadavg()[0]
    print(f"\n{datetime.date.today()}  {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads, load average {load:.2f}\n")
    print("| kernel | " + " | ".join(f"{s} M={m}" for s, _, _ in SHAPES for m in ms) + " |")
    print("|---|" + "---|" * (len(SHAPES) * len(ms)))
    for name in names:
        cells = []
        for shape, _, _ in SHAPES:
            for m in ms:
                t, base = results[(shape, name, m)], results[(shape, "fp32 F.linear", m)]
                cells.append(f"{t:.0f} us ({base / t:.1f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
