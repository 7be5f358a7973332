"""Data-parallel serving: aggregate throughput of --data-parallel-size 2 against one engine, and the router's
added latency per request, in one run.

    python bench/data_parallel.py [--model default] [--concurrency 16] [--output-len 64] [--num-probes 40]
                                  [--out FILE]

Rows (each server started, measured and stopped in turn, on loopback only):
  dp=1, 1 thread    one engine process (`roofline serve --threads 1`): the baseline
  dp=1, 2 threads   one engine on both threads (what a 2-core box would run without replicas)
  dp=2, 1 thread    two replicas of 1 thread each behind the router

Throughput: --concurrency streamed /v1/completions at once, distinct prompts, exactly --output-len tokens
each (EOS ignored); generated tokens / wall time from the first send to the last [DONE].
Router overhead (dp=2 only): --num-probes sequential requests alternating between the router and one of
its replicas directly (its port and internal key read from the child process), p50 of each: a
one-token completion and GET /v1/models (no engine work: the proxy hop alone).
Figures are reported as ratios to the baseline row of the same run; other processes' CPU use during
each row is shown, since on a shared machine it skews the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import httpx
import psutil

HOST = "127.0.0.1"
KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(model: str, dp: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, "-m", "roofline.cli", "serve", "--model", model, "--port", str(port), "--threads",
            str(threads), "--log-level", "warning", "--api-key", KEY, "--kv-cache-memory", "256MiB"]
    if dp > 1:
        argv += ["--data-parallel-size", str(dp)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("ROOFLINE_API_KEY", None)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            body = httpx.get(f"{url}/health", timeout=2).json()
            if body.get("status") == "ok" and body.get("replicas", {"healthy": dp})["healthy"] == dp:
                return proc, url
        except (httpx.HTTPError, ValueError):
            pass
        assert proc.poll() is None, "the server exited"
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def prompt(i: int) -> str:
    return f"Request {i}: write a short story about the number {i * 7919 % 1000} and a lighthouse keeper."


async def one_stream(client: httpx.AsyncClient, url: str, i: int, output_len: int) -> int:
    body = {"prompt": prompt(i), "max_tokens": output_len, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0.0}
    num_tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[len("data: "):]).get("usage")
                if usage:
                    num_tokens = usage["completion_tokens"]
    return num_tokens


async def throughput(url: str, concurrency: int, output_len: int) -> float:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(headers=headers, timeout=300) as client:
        await one_stream(client, url, -1, 4)  # warm: first-request costs out of the measurement
        start = time.perf_counter()
        counts = await asyncio.gather(*(one_stream(client, url, i, output_len) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    assert all(c == output_len for c in counts), counts
    return sum(counts) / elapsed


def replica_endpoint(front_end: subprocess.Popen) -> tuple[str, str]:
    """URL and internal key of the front end's first replica (read from the child process)."""
    child = next(c for c in psutil.Process(front_end.pid).children() if "serve" in c.cmdline())
    cmd = child.cmdline()
    return f"http://{HOST}:{cmd[cmd.index('--port') + 1]}", child.environ()["ROOFLINE_API_KEY"]


def overhead(router_url: str, replica_url: str, replica_key: str, num_probes: int) -> dict[str, tuple[float, float]]:
    """p50 seconds (router, direct) of a one-token completion and of GET /v1/models, requests alternating."""
    targets = {"router": (router_url, KEY), "direct": (replica_url, replica_key)}
    clients = {name: httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
               for name, (url, key) in targets.items()}
    body = {"prompt": "The lighthouse keeper said", "max_tokens": 1, "temperature": 0.0}
    times: dict[tuple[str, str], list[float]] = {}
    try:
        for probe in ("completion", "models"):
            for _ in range(num_probes):
                for name, client in clients.items():
                    start = time.perf_counter()
                    resp = client.post("/v1/completions", json=body) if probe == "completion" else client.get(
                        "/v1/models")
                    times.setdefault((probe, name), []).append(time.perf_counter() - start)
                    resp.raise_for_status()
    finally:
        for client in clients.values():
            client.close()
    return {probe: (statistics.median(times[(probe, "router")]), statistics.median(times[(probe, "direct")]))
            for probe in ("completion", "models")}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--num-probes", type=int, default=40)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    rows = []
    overheads = None
    for dp, threads in ((1, 1), (1, 2), (2, 1)):
        proc, url = start_server(args.model, dp, threads)
        try:
            busy_before = psutil.cpu_times()
            own_before = _tree_cpu(proc)
            wall = time.perf_counter()
            tok_s = asyncio.run(throughput(url, args.concurrency, args.output_len))
            wall = time.perf_counter() - wall
            busy = _busy(psutil.cpu_times()) - _busy(busy_before)
            others = max(0.0, (busy - (_tree_cpu(proc) - own_before)) / wall)
            if dp > 1:
                overheads = overhead(url, *replica_endpoint(proc), args.num_probes)
        finally:
            stop_server(proc)
        rows.append((f"dp={dp}, {threads} thread{'s' if threads > 1 else ''}", tok_s, others))

    base = rows[0][1]
    lines = [f"{datetime.date.today().isoformat()}, {cpu_name()}, {os.cpu_count()} cores, model {args.model}, "
             f"{args.concurrency} concurrent streams x {args.output_len} tokens", "",
             "| server | tok/s | vs dp=1, 1 thread | other CPU (cores) |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {tok_s:.1f} | {tok_s / base:.2f}x | {others:.2f} |" for name, tok_s, others in rows]
    if overheads is not None:
        lines += ["", "| router overhead (dp=2), p50 | through router | direct to a replica | added |",
                  "|---|---:|---:|---:|"]
        for probe, (routed, direct) in overheads.items():
            label = "1-token completion" if probe == "completion" else "GET /v1/models"
            lines.append(f"| {label} | {routed * 1e3:.1f} ms | {direct * 1e3:.1f} ms | "
                         f"{(routed - direct) * 1e3:.1f} ms |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


def _busy(times) -> float:
    return times.user + times.system + getattr(times, "nice", 0.0)


def _tree_cpu(proc: subprocess.Popen) -> float:
    """CPU seconds of the server process and its children so far."""
    total = 0.0
    try:
        root = psutil.Process(proc.pid)
        for p in [root, *root.children(recursive=True)]:
            t = p.cpu_times()
            total += t.user + t.system
    except psutil.NoSuchProcess:
        pass
    return total


if __name__ == "__main__":
    sys.exit(main())
