"""Goodput under a mixed open-loop workload, for --scheduling fifo, priority and slo in the same run;
then fair shares between two tenants, one sending 10x the other.

    python bench/slo.py [--model default] [--duration 40] [--rates 0.5,0.75,1] [--threads 2]

Interactive requests (short prompts, 32 tokens, TTFT <= 1 s and TPOT <= 100 ms, class "interactive",
priority 0) and batch requests (long prompts, 128 tokens, no target, class "bulk", priority 1) arrive
as Poisson processes; the rate multiplier scales both. Each policy gets its own `roofline serve` with
the same flags but --scheduling, warmed up the same way. Requests that arrive within `--duration`
seconds count; an interactive request still unfinished at the end counts as missed. Printed per policy
and rate: goodput (finished requests that met their targets, batch ones included, per second),
interactive attainment, batch generated tok/s, p50/p99 TTFT and TPOT per class. The fairness part
bursts 220 requests from tenant A and 22 from B (interleaved, `user` field) at a server with 8 seats
(so both stay backlogged) and reports each tenant's share of the tokens streamed until B's last request
has its first token (after which B is no longer backlogged).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
from machine import cpu_name

INTERACTIVE = {"ttft_ms": 1000.0, "tpot_ms": 100.0}
CLASS_FLAGS = ["--slo-class", "interactive=ttft:1s,tpot:100ms,priority:0", "--slo-class", "bulk=priority:1"]
FAIRNESS_SEATS = 8
FAIRNESS_REQUESTS = 242  # 220 from A, 22 from B: long enough a backlog that shares settle
WORDS = "the of and to in is was for on that with as by at from his her an which or be this are".split()


def text(num_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


@dataclass
class Result:
    kind: str  # "interactive", "batch", or a tenant name
    start: float
    first: float | None = None
    end: float | None = None
    token_times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.start

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return None if n < 2 else (self.token_times[-1] - self.token_times[0]) / (n - 1)

    def met(self) -> bool:
        if self.end is None or self.error:
            return False
        if self.kind != "interactive":
            return True
        return self.ttft * 1e3 <= INTERACTIVE["ttft_ms"] and (self.tpot is None or self.tpot * 1e3 <= INTERACTIVE["tpot_ms"])


async def stream(client: httpx.AsyncClient, body: dict, result: Result) -> None:
    try:
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error")
                    return
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.monotonic()
                    result.first = result.first or now
                    result.token_times.append(now)
        result.end = time.monotonic()
    except (httpx.HTTPError, asyncio.CancelledError) as exc:
        result.error = type(exc).__name__


def interactive_body(i: int) -> dict:
    return {"prompt": text(24, i), "max_tokens": 32, "ignore_eos": True, "temperature": 0, "slo_class": "interactive"}


def batch_body(i: int) -> dict:
    return {"prompt": text(320, 10_000 + i), "max_tokens": 128, "ignore_eos": True, "temperature": 0,
            "slo_class": "bulk"}


async def open_loop(base_url: str, rate_interactive: float, rate_batch: float, duration: float, seed: int,
                    grace: float) -> list[Result]:
    rng = random.Random(seed)
    arrivals = []
    for kind, rate in (("interactive", rate_interactive), ("batch", rate_batch)):
        t = rng.expovariate(rate)
        while t < duration:
            arrivals.append((t, kind))
            t += rng.expovariate(rate)
    arrivals.sort()
    results: list[Result] = []
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(base_url=base_url, timeout=None, limits=limits) as client:
        t0 = time.monotonic()
        tasks = []
        for i, (at, kind) in enumerate(arrivals):
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            res = Result(kind, time.monotonic())
            results.append(res)
            body = interactive_body(i) if kind == "interactive" else batch_body(i)
            tasks.append(asyncio.create_task(stream(client, body, res)))
        await asyncio.sleep(max(0.0, t0 + duration + grace - time.monotonic()))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return results


async def fairness(base_url: str) -> dict[str, float]:
    results = []
    async with httpx.AsyncClient(base_url=base_url, timeout=None,
                                 limits=httpx.Limits(max_connections=1000)) as client:
        tasks = []
        for i in range(FAIRNESS_REQUESTS):
            tenant = "b" if i % 11 == 10 else "a"
            res = Result(tenant, time.monotonic())
            results.append(res)
            body = {"prompt": text(24, 50_000 + i), "max_tokens": 48, "ignore_eos": True, "temperature": 0,
                    "user": tenant}
            tasks.append(asyncio.create_task(stream(client, body, res)))
        await asyncio.gather(*tasks)
    window_end = max(r.first for r in results if r.kind == "b")
    tokens = {t: sum(1 for r in results if r.kind == t for s in r.token_times if s <= window_end) for t in "ab"}
    total = sum(tokens.values()) or 1
    return {t: tokens[t] / total for t in tokens}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, scheduling: str, threads: int, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [os.path.join(os.path.dirname(sys.executable), "roofline"), "serve", "--model", model, "--port", str(port),
           "--threads", str(threads), "--scheduling", scheduling, "--max-queue", "100000", "--log-level", "warning",
           *CLASS_FLAGS, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


async def warm_up(url: str) -> None:
    # fits the step-time model (16+ steps of varied shapes) and warms the caches, the same for every policy
    await open_loop(url, 2.0, 0.5, 8.0, seed=999, grace=20.0)


def pct(values: list[float], q: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(results: list[Result], duration: float) -> dict:
    inter = [r for r in results if r.kind == "interactive"]
    batch = [r for r in results if r.kind == "batch"]
    return {
        "goodput": sum(r.met() for r in results) / duration,
        "attainment": sum(r.met() for r in inter) / max(len(inter), 1),
        "batch_tok_s": sum(len(r.token_times) for r in batch) / duration,
        "num": (len(inter), len(batch)),
        "errors": sum(1 for r in results if r.error and r.error != "CancelledError"),
        **{f"{k}_{m}_p{int(q * 100)}": pct([getattr(r, m) for r in rs], q)
           for k, rs in (("i", inter), ("b", batch)) for m in ("ttft", "tpot") for q in (0.5, 0.99)},
    }


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--duration", type=float, default=40.0)
    p.add_argument("--grace", type=float, default=15.0, help="seconds after the last arrival before cutting off")
    p.add_argument("--rates", default="0.5,0.75,1", help="multipliers of the base rates")
    p.add_argument("--base-interactive", type=float, default=1.0, help="interactive requests/s at multiplier 1")
    p.add_argument("--base-batch", type=float, default=0.5, help="batch requests/s at multiplier 1")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--policies", default="fifo,priority,slo")
    p.add_argument("--skip-fairness", action="store_true")
    args = p.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    print(f"# bench/slo.py, {datetime.date.today()}, {cpu_name()}, {os.cpu_count()} cores, {args.threads} threads, "
          f"model {args.model}; interactive {args.base_interactive}/s x rate (24 words, 32 tokens, TTFT<=1s, "
          f"TPOT<=100ms), batch {args.base_batch}/s x rate (320 words, 128 tokens), {args.duration:g} s each")
    table, shares = [], {}
    for policy in args.policies.split(","):
        proc, url = start_server(args.model, policy, args.threads)
        try:
            asyncio.run(warm_up(url))
            for rate in rates:
                res = asyncio.run(open_loop(url, args.base_interactive * rate, args.base_batch * rate, args.duration,
                                            seed=int(rate * 1000), grace=args.grace))
                table.append((policy, rate, summarize(res, args.duration)))
                print(f"  {policy} x{rate:g}: done", file=sys.stderr, flush=True)
        finally:
            stop_server(proc)
        if not args.skip_fairness and policy in ("fifo", "slo"):
            # few seats, so that both tenants stay backlogged: B's 22 requests outnumber its fair share of them
            proc, url = start_server(args.model, policy, args.threads, "--max-num-seqs", str(FAIRNESS_SEATS))
            try:
                shares[policy] = asyncio.run(fairness(url))
            finally:
                stop_server(proc)
    print("| policy | rate | requests (int/batch) | goodput req/s | interactive attainment | batch tok/s | "
          "int TTFT p50/p99 ms | int TPOT p50/p99 ms | batch TTFT p50/p99 ms | batch TPOT p50/p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for policy, rate, s in table:
        print(f"| {policy} | x{rate:g} | {s['num'][0]}/{s['num'][1]} | {s['goodput']:.2f} | {s['attainment']:.0%} | "
              f"{s['batch_tok_s']:.1f} | {ms(s['i_ttft_p50'])}/{ms(s['i_ttft_p99'])} | "
              f"{ms(s['i_tpot_p50'])}/{ms(s['i_tpot_p99'])} | {ms(s['b_ttft_p50'])}/{ms(s['b_ttft_p99'])} | "
              f"{ms(s['b_tpot_p50'])}/{ms(s['b_tpot_p99'])} | {s['errors']} |")
    if shares:
        print("\n| policy | tenant A share (sends 10x) | tenant B share |\n|---|---|---|")
        for policy, sh in shares.items():
            print(f"| {policy} | {sh['a']:.0%} | {sh['b']:.0%} |")


if __name__ == "__main__":
    main()
