"""Online serving benchmark: open-loop Poisson load against roofline's server and, in the same run,
llama-cpp-python's OpenAI-compatible server on the same GGUF (when installed).

    python bench/serve.py [--model default] [--rates 1,2,4] [--num-requests 40] [--duration 30]
                          [--prompt-len 128] [--output-len 32] [--slo-ttft 2.0] [--slo-tpot 0.2]
                          [--threads N] [--seed 0] [--engines roofline,llama-cpp-python] [--out FILE]

For each engine and each rate, requests arrive at exponential intervals (a Poisson process, seeded)
whether or not earlier ones have finished; arrivals stop after --num-requests or --duration seconds,
whichever comes first, and requests still running --grace seconds later are cancelled and counted as
failed. Every request streams /v1/completions with a distinct prompt of about --prompt-len tokens and
generates exactly --output-len tokens (EOS ignored); each rate gets its own prompts, so no rate hits
the prefix cache another one filled. Reported per row:

  TTFT   time to first token (first streamed text), p50 / p99
  TPOT   time per output token after the first: (last - first) / (tokens - 1), p50 / p99
  tok/s  generated tokens per second over the run (first arrival to last completion)
  goodput  requests per second that met both SLOs (TTFT <= --slo-ttft, TPOT <= --slo-tpot)
  other CPU  cores kept busy by other processes during the row: on a shared machine they skew it

llama-cpp-python's server runs one request at a time (concurrent ones wait for a lock); roofline
batches them continuously. Both use the same thread count.

Servers listen on loopback only and are started and stopped by this script; nothing else is contacted.
Prints one markdown table (also written to --out with the date, machine and load).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
import psutil

HOST = "127.0.0.1"  # loopback only
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force "
         "education").split()


@dataclass
class Result:
    """One request's timings."""

    ok: bool
    ttft: float = 0.0
    tpot: float | None = None  # None with fewer than two tokens
    num_tokens: int = 0
    end: float = 0.0  # monotonic time the last byte arrived
    error: str | None = None  # why it failed


@dataclass
class Row:
    """One (engine, rate) measurement."""

    engine: str
    rate: float
    results: list[Result] = field(default_factory=list)
    wall: float = 0.0
    other_cpu: float = 0.0  # cores busy with processes other than this benchmark and its server


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of values; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def make_prompts(n: int, length: int, tokenizer, seed: int, tag: str) -> list[str]:
    """n distinct prompts of about `length` tokens; distinct openings (`tag`, index) defeat the prefix cache."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        words = [f"Request {tag}-{i}:"]
        while len(tokenizer.encode(" ".join(words))) < length:
            words.append(rng.choice(WORDS))
        prompts.append(" ".join(words))
    return prompts


def free_port() -> int:
    """An unused loopback port."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    """Wait until the server answers GET /v1/models."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not start in time")


class CpuMeter:
    """CPU time used by everything except this process and the server under test, in cores."""

    def __init__(self, server_pid: int) -> None:
        self.own = [psutil.Process(), psutil.Process(server_pid)]
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        t = psutil.cpu_times()
        busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
        own = 0.0
        for p in self.own:
            try:
                c = p.cpu_times()
                own += c.user + c.system
            except psutil.Error:
                pass
        return time.monotonic(), busy, own

    def other_cores(self) -> float:
        """Average cores used by other processes since construction."""
        t1, busy1, own1 = self._sample()
        t0, busy0, own0 = self.start
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-9)


def wait_quiet(max_wait: float, max_busy_percent: float = 25.0) -> None:
    """Wait (at most max_wait s) until the machine's CPUs are nearly idle: it may be shared."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline and psutil.cpu_percent(interval=3) > max_busy_percent:
        pass


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it lingers."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def one_request(client: httpx.AsyncClient, body: dict) -> Result:
    """Stream one completion and time it."""
    start = time.monotonic()
    first = last = None
    num_chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return Result(ok=False, end=time.monotonic(), error=f"HTTP {resp.status_code}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.monotonic()
                    first = first or now
                    last = now
                    num_chunks += 1
    except httpx.HTTPError as exc:
        return Result(ok=False, end=time.monotonic(), error=type(exc).__name__)
    if first is None:
        return Result(ok=False, end=time.monotonic(), error="no text")
    num_tokens = usage_tokens or num_chunks
    tpot = (last - first) / (num_tokens - 1) if num_tokens > 1 else None
    return Result(ok=True, ttft=first - start, tpot=tpot, num_tokens=num_tokens, end=last)


async def run_rate(url: str, engine: str, rate: float, prompts: list[str], args, extra: dict,
                   server_pid: int) -> Row:
    """Open-loop Poisson arrivals at `rate` req/s, bounded by count and time."""
    rng = random.Random(args.seed)
    row = Row(engine, rate)
    meter = CpuMeter(server_pid)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(args.duration + args.grace),
                                 limits=limits) as client:
        tasks = []
        t0 = time.monotonic()
        next_at = t0
        for i, prompt in enumerate(prompts[:args.num_requests]):
            next_at += rng.expovariate(rate)
            if next_at - t0 > args.duration:
                break
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            body = {"model": args.served_name, "prompt": prompt, "max_tokens": args.output_len, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}, **extra}
            tasks.append(asyncio.create_task(one_request(client, body)))
        done, pending = await asyncio.wait(tasks, timeout=args.grace) if tasks else (set(), set())
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        row.results = [t.result() if t in done else Result(ok=False, error="cut after --grace") for t in tasks]
        ends = [r.end for r in row.results if r.ok]
        row.wall = (max(ends) if ends else time.monotonic()) - t0
    row.other_cpu = meter.other_cores()
    return row


def summarize(row: Row, args) -> dict:
    """The table columns of one row."""
    ok = [r for r in row.results if r.ok]
    ttft = [r.ttft for r in ok]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    good = [r for r in ok if r.ttft <= args.slo_ttft and (r.tpot or 0.0) <= args.slo_tpot]
    wall = row.wall or float("nan")
    return {"engine": row.engine, "rate": row.rate, "sent": len(row.results), "ok": len(ok),
            "ttft50": percentile(ttft, 50), "ttft99": percentile(ttft, 99),
            "tpot50": percentile(tpot, 50) * 1e3, "tpot99": percentile(tpot, 99) * 1e3,
            "tok_s": sum(r.num_tokens for r in ok) / wall, "req_s": len(ok) / wall, "goodput": len(good) / wall,
            "other_cpu": row.other_cpu}


def table(rows: list[dict]) -> str:
    """The results as one markdown table."""
    head = ("| engine | rate (req/s) | sent | ok | TTFT p50 (s) | TTFT p99 (s) | TPOT p50 (ms) | TPOT p99 (ms) "
            "| tok/s | req/s | goodput (req/s) | other CPU |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['engine']} | {r['rate']:g} | {r['sent']} | {r['ok']} | {r['ttft50']:.3f} | {r['ttft99']:.3f} "
             f"| {r['tpot50']:.1f} | {r['tpot99']:.1f} | {r['tok_s']:.1f} | {r['req_s']:.2f} | {r['goodput']:.2f} "
             f"| {r['other_cpu']:.2f} |"
             for r in rows]
    return head + "\n".join(lines)


def start_roofline(args, port: int) -> subprocess.Popen:
    """`roofline serve` on loopback."""
    cmd = [sys.executable, "-m", "roofline.cli", "serve", "--model", args.model, "--host", HOST, "--port", str(port),
           "--kv-cache-memory", args.kv_cache_memory, "--log-level", "warning", "--max-queue", "100000"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return _spawn(cmd, args)


def _spawn(cmd: list[str], args) -> subprocess.Popen:
    log = open(args.server_log, "a") if args.server_log else subprocess.DEVNULL  # noqa: SIM115 (lives with proc)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def start_llama_cpp(args, path: str, port: int) -> subprocess.Popen | None:
    """llama-cpp-python's server on the same GGUF, or None (with a message) when it is not installed."""
    try:
        import llama_cpp.server.app  # noqa: F401  (needs the [server] extras)
    except ImportError as exc:
        print(f"llama-cpp-python server not available ({exc}); skipping it "
              f"(pip install 'llama-cpp-python[server]')", file=sys.stderr)
        return None
    threads = args.threads or os.cpu_count() or 1
    n_ctx = 4 * (args.prompt_len + args.output_len) + 64
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", path, "--host", HOST, "--port", str(port),
           "--model_alias", args.served_name, "--n_ctx", str(n_ctx), "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--verbose", "False",
           "--interrupt_requests", "False"]  # queue concurrent requests instead of cutting the running one
    return _spawn(cmd, args)


def main() -> int:
    """Run the benchmark and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--rates", default="1,2,4", help="comma-separated request rates (req/s)")
    p.add_argument("--num-requests", type=int, default=40, help="at most this many requests per rate")
    p.add_argument("--duration", type=float, default=30.0, help="arrivals stop after this many seconds")
    p.add_argument("--grace", type=float, default=60.0, help="seconds to wait for stragglers after arrivals stop")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--slo-ttft", type=float, default=2.0, help="seconds")
    p.add_argument("--slo-tpot", type=float, default=0.2, help="seconds per output token")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per server (default: all cores)")
    p.add_argument("--kv-cache-memory", default="512MiB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engines", default="roofline,llama-cpp-python", help="which servers to run, in order")
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="before each server, wait up to this many seconds for the CPUs to be nearly idle")
    p.add_argument("--server-log", default=None, help="append the servers' output to this file")
    p.add_argument("--out", default=None, help="also write the table (with date, machine, load) here")
    args = p.parse_args()
    rates = [float(r) for r in args.rates.split(",")]

    from roofline.loaders import open_model, resolve_model_path
    from roofline.engine_args import served_model_name

    path = resolve_model_path(args.model)
    tokenizer = open_model(args.model).tokenizer()
    args.served_name = served_model_name(args.model)
    # fresh prompts for every rate (the same for every engine), so no rate reuses another's prefix cache
    prompts_by_rate = [make_prompts(args.num_requests, args.prompt_len, tokenizer, args.seed * 1000 + k, f"r{k}")
                       for k in range(len(rates))]
    warm_prompt = make_prompts(1, args.prompt_len, tokenizer, args.seed, "warm-up")[0]
    load_before = os.getloadavg()[0]

    wanted = args.engines.split(",")
    engines = []
    if "roofline" in wanted:
        engines.append(("roofline", lambda port: start_roofline(args, port), {"ignore_eos": True}))
    if "llama-cpp-python" in wanted:
        if path.endswith(".gguf"):
            eos_bias = {str(t): -100.0 for t in tokenizer.eos_token_ids}  # its way to ignore EOS
            engines.append(("llama-cpp-python", lambda port: start_llama_cpp(args, path, port),
                            {"logit_bias": eos_bias}))
        else:
            print("llama-cpp-python needs a .gguf model; skipping it", file=sys.stderr)

    rows = []
    for name, start, extra in engines:
        wait_quiet(args.wait_quiet)
        port = free_port()
        proc = start(port)
        if proc is None:
            continue
        url = f"http://{HOST}:{port}"
        try:
            wait_ready(url, proc)
            warm = {"model": args.served_name, "prompt": warm_prompt, "max_tokens": 4, "temperature": 0}
            httpx.post(f"{url}/v1/completions", json=warm, timeout=120)
            for rate, prompts in zip(rates, prompts_by_rate):
                row = asyncio.run(run_rate(url, name, rate, prompts, args, extra, proc.pid))
                rows.append(summarize(row, args))
                errors = sorted({r.error for r in row.results if r.error})
                if errors:
                    print(f"{name} at {rate:g} req/s: failures: {', '.join(errors)}", file=sys.stderr)
                print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        finally:
            stop(proc)

    load_after = os.getloadavg()[0]
    header = (f"Serving benchmark ({datetime.date.today().isoformat()}, {platform.machine()}, "
              f"{os.cpu_count()} CPU cores, no GPU; 1-min load average {load_before:.2f} before, "
              f"{load_after:.2f} after)\n\n"
              f"model {args.served_name}; prompt ~{args.prompt_len} tokens, output {args.output_len} tokens; "
              f"at most {args.num_requests} requests or {args.duration:g} s per rate; "
              f"SLO: TTFT <= {args.slo_ttft:g} s and TPOT <= {args.slo_tpot * 1e3:g} ms; threads per server "
              f"{args.threads or os.cpu_count()}.\n\n")
    text = header + table(rows) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
