"""Cold start: time from process start to the first token, split into import, weight load and warm-up.

    python bench/cold_start.py [--model default] [--runs 3] [--threads N] [--only generate|serve]
                               [--baseline-src DIR]

--baseline-src DIR: also time the roofline package in DIR (e.g. `git archive REV roofline | tar -x -C DIR`),
its runs alternating with this tree's so that both see the same load; the ratio of the medians is printed.

Two start-ups, each run --runs times in fresh processes (median reported, wall and CPU = user + sys):
  generate   `roofline generate --model M --prompt Hi --max-tokens 1`, from spawn to exit
  serve      `roofline serve --model M`, from spawn until /health answers 200, then until a first
             /v1/completions (prompt "Hi", 1 token) returns

Each child runs the real CLI (`roofline.cli.main`) with timestamps hooked onto its stages:
  interpreter     spawn -> the child's first line (Python itself, site-packages)
  import torch    `import torch`
  import roofline the engine's modules (roofline.cli imports roofline.llm and what it needs)
  cli             argument parsing and the command's own imports, up to LLM() (serve: FastAPI, uvicorn)
  open model      LLM() up to ModelRunner.load: the GGUF/HF file's layout, config and tokenizer
  weights         ModelRunner.load without the kernel choice: build, quantize, fill from the file
  kernels         the kernel choice (select_model_kernels; a cached probe only installs the tables)
  engine rest     LLM() after the weights: KV cache, scheduler, output processor
  first token     LLM() done -> the first engine step that samples a token (first-call warm-up included)
  command rest    the command after that token (generate: print, return) up to main() returning
  teardown        generate only: main() returned -> the process has exited (interpreter shutdown)
--only ray (not in the default set: it starts a local Ray): `roofline serve --backend ray --autoscale 0,1
--idle-timeout 2`, spawn -> first answer, then, once its replica has gone, the first answer after zero
replicas (Ray schedules and starts a replica while the request waits) against a warm one.
Other processes' CPU use while each run went is shown: the machine may be shared.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HOST = "127.0.0.1"
MARKS_ENV = "ROOFLINE_COLD_START_MARKS"  # the child appends {"mark", "t", "cpu"} lines to this file
T0_ENV = "ROOFLINE_COLD_START_T0"  # the parent's time.time() just before spawning the child
PAUSE_GC_ENV = "ROOFLINE_COLD_START_PAUSE_GC"  # "1": the tree's CLI turns the collector off at start-up
STAGES = [("interpreter", "spawn", "start"), ("import torch", "start", "torch"),
          ("import roofline", "torch", "roofline"), ("cli", "roofline", "llm_start"),
          ("open model", "llm_start", "load_start"), ("weights", "load_start", "kernels_start"),
          ("kernels", "kernels_start", "kernels_end"), ("engine rest", "kernels_end", "llm_end"),
          ("first token", "llm_end", "first_token"), ("command rest", "first_token", "exit")]


def _child(argv: list[str]) -> None:
    """Run the CLI with stage marks appended to $ROOFLINE_COLD_START_MARKS."""
    marks = open(os.environ[MARKS_ENV], "a", buffering=1)

    def mark(name: str) -> None:
        marks.write(json.dumps({"mark": name, "t": time.time(), "cpu": time.process_time()}) + "\n")

    mark("start")
    if os.environ.get(PAUSE_GC_ENV) == "1":
        # as main() does for these commands before anything imports torch (its own call then finds the
        # collector off and leaves it so; make_llm turns it back on and freezes the start-up's objects)
        import gc

        import importlib.util

        if importlib.util.find_spec("roofline.engine_args") is not None:  # where the flag lives since 2026-12-04
            import roofline.engine_args as state
        else:
            import roofline.cli as state
        gc.disable()
        state._gc_paused = True
    import torch  # noqa: F401 - timed on its own

    mark("torch")
    import roofline.cli as cli
    import roofline.engine.llm_engine as llm_engine
    import roofline.engine.model_runner as model_runner
    import roofline.llm as llm

    mark("roofline")

    def around(before: str, after: str, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            mark(before)
            out = fn(*args, **kwargs)
            mark(after)
            return out
        return wrapped

    llm.LLM.__init__ = around("llm_start", "llm_end", llm.LLM.__init__)
    load = model_runner.ModelRunner.load.__func__
    model_runner.ModelRunner.load = classmethod(around("load_start", "load_end", load))
    model_runner.select_model_kernels = around("kernels_start", "kernels_end", model_runner.select_model_kernels)
    step = llm_engine.LLMEngine.step
    seen = []

    @functools.wraps(step)
    def first_step(self, *args, **kwargs):
        outs = step(self, *args, **kwargs)
        if not seen and any(o.outputs and o.outputs[0].token_ids for o in outs):
            seen.append(True)
            mark("first_token")
        return outs

    llm_engine.LLMEngine.step = first_step
    sys.argv = ["roofline", *argv]
    code = cli.main()  # as the console script calls it
    mark("exit")
    marks.close()
    sys.exit(code)


def _read_marks(path: str) -> dict[str, tuple[float, float]]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["mark"]: (r["t"], r["cpu"]) for r in rows}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _busy_cpu_s() -> float:
    import psutil

    t = psutil.cpu_times()
    return t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def _spawn(cli_args: list[str], marks_path: str, threads: int | None, src: str | None
           ) -> tuple[subprocess.Popen, float]:
    env = dict(os.environ)
    env.pop("ROOFLINE_API_KEY", None)
    if src is not None:  # that tree's roofline package ahead of the installed one
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(src), *filter(None, [env.get("PYTHONPATH")])])
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
        cli_args = [*cli_args, "--threads", str(threads)]
    env[MARKS_ENV] = marks_path
    cli_path = os.path.join(src, "roofline", "cli.py") if src else importlib.util.find_spec("roofline.cli").origin
    with open(cli_path) as f:
        env[PAUSE_GC_ENV] = "1" if "_pause_gc_for_start_up" in f.read() else "0"
    t0 = time.time()
    env[T0_ENV] = repr(t0)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", *cli_args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, t0


def run_generate(model: str, threads: int | None, src: str | None = None) -> dict[str, float]:
    """One `roofline generate` start: stage seconds (wall, and cpu_ keys), total wall and CPU to exit."""
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
        path = f.name
    busy0 = _busy_cpu_s()
    proc, t0 = _spawn(["generate", "--model", model, "--prompt", "Hi", "--max-tokens", "1"], path, threads, src)
    _, status, usage = os.wait4(proc.pid, 0)
    end = time.time()
    stderr = proc.stderr.read().decode(errors="replace")
    if status != 0:
        raise SystemExit(f"generate failed: {stderr.strip().splitlines()[-1:]}")
    marks = _read_marks(path)
    os.unlink(path)
    cpu = usage.ru_utime + usage.ru_stime
    row = _stages(marks, t0)
    row.update(teardown=end - marks["exit"][0], total=end - t0, cpu_total=cpu, others=max(_busy_cpu_s() - busy0 - cpu, 0.0) / (end - t0))
    return row


def run_serve(model: str, threads: int | None, src: str | None = None) -> dict[str, float]:
    """One `roofline serve` start: stages, then spawn -> /health 200 and spawn -> first completion returned."""
    import httpx
    import psutil

    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
        path = f.name
    port = _free_port()
    busy0 = _busy_cpu_s()
    proc, t0 = _spawn(["serve", "--model", model, "--host", HOST, "--port", str(port), "--log-level", "warning"],
                      path, threads, src)
    url = f"http://{HOST}:{port}"
    try:
        with httpx.Client(timeout=60) as client:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"serve exited: {proc.stderr.read().decode(errors='replace')[-300:]}")
                try:
                    if client.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.01)
            health = time.time()
            r = client.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
            first = time.time()
            r.raise_for_status()
            times = psutil.Process(proc.pid).cpu_times()
            cpu = times.user + times.system
    finally:
        proc.terminate()
        proc.wait(30)
    marks = _read_marks(path)
    os.unlink(path)
    row = _stages(marks, t0)
    row.pop("command rest", None)  # serve's command runs until it is stopped
    row.update(health=health - t0, total=first - t0, cpu_total=cpu,
               others=max(_busy_cpu_s() - busy0 - cpu, 0.0) / (time.time() - t0))
    return row


def run_ray(model: str, threads: int | None, src: str | None = None) -> dict[str, float]:
    """`roofline serve --backend ray --autoscale 0,1` on a local Ray: spawn -> first answer, then the
    first answer after it scaled to zero (a replica scheduled, started and loaded while the request
    waits), against a warm request."""
    import httpx
    import psutil

    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           # report load every 0.5 s (Ray's default: 10 s), so the idle replica goes in seconds
           "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
           "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}
    env.pop("ROOFLINE_API_KEY", None)
    if src is not None:
        env["PYTHONPATH"] = os.path.abspath(src)
    argv = [sys.executable, "-m", "roofline.cli", "serve", "--backend", "ray", "--model", model, "--host", HOST,
            "--port", str(port), "--autoscale", "0,1", "--idle-timeout", "2", "--log-level", "warning"]
    if threads is not None:
        argv += ["--threads", str(threads)]
    t0 = time.time()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://{HOST}:{port}"
    body = {"prompt": "Hi", "max_tokens": 1}

    def replicas() -> int:
        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return 0
        return sum(1 for p in tree if "ServeReplica" in " ".join(_cmdline(p)))

    row: dict[str, float] = {}
    try:
        with httpx.Client(timeout=120) as client:
            while True:
                if proc.poll() is not None or time.time() - t0 > 180:
                    raise SystemExit("serve --backend ray did not come up")
                try:
                    if client.post(f"{url}/v1/completions", json=body).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            row["total"] = time.time() - t0
            deadline = time.time() + 120
            while replicas() and time.time() < deadline:
                time.sleep(0.2)
            if replicas():
                raise SystemExit("the replica did not scale to zero")
            time.sleep(1.0)
            start = time.time()
            client.post(f"{url}/v1/completions", json=body).raise_for_status()
            row["from_zero"] = time.time() - start
            start = time.time()
            client.post(f"{url}/v1/completions", json=body).raise_for_status()
            row["warm"] = time.time() - start
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # its own session: the Ray processes it started, and nothing else
            proc.wait()
    row["cpu_total"] = 0.0
    return row


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:  # noqa: BLE001 - a process that just went
        return []


def _stages(marks: dict[str, tuple[float, float]], t0: float) -> dict[str, float]:
    marks = {"spawn": (t0, 0.0), **marks}
    row = {}
    if "first_token" in marks:
        row["first_token"], row["cpu_first_token"] = marks["first_token"][0] - t0, marks["first_token"][1]
    for name, a, b in STAGES:
        if a in marks and b in marks:
            row[name] = marks[b][0] - marks[a][0]
            row["cpu_" + name] = marks[b][1] - marks[a][1]
    return row


def _table(title: str, rows: list[dict[str, float]], extra: list[tuple[str, str]]) -> str:
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    others = ", ".join(f"{r['others']:.2f}" for r in rows)
    lines = [f"{title} (median of {len(rows)}; other processes kept {others} cores busy during the runs)",
             f"  {'stage':<16}{'wall s':>8}{'cpu s':>8}"]
    for name, _, _ in STAGES:
        if all(name in r for r in rows):
            lines.append(f"  {name:<16}{med(name):8.2f}{med('cpu_' + name):8.2f}")
    if all("first_token" in r for r in rows):
        lines.append(f"  {'FIRST TOKEN':<16}{med('first_token'):8.2f}{med('cpu_first_token'):8.2f}   (spawn -> first token)")
    for label, key in extra:
        cpu = f"{med('cpu_total'):8.2f}" if key == "total" else ""
        lines.append(f"  {label:<16}{med(key):8.2f}{cpu}")
    lines.append("  runs (wall): " + ", ".join(f"{r['total']:.2f}" for r in rows))
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="--threads for the CLI (default: its own)")
    parser.add_argument("--only", choices=["generate", "serve", "ray"], default=None,
                        help="one start-up (ray: serve --backend ray from zero replicas; not run by default)")
    parser.add_argument("--baseline-src", default=None, help="a directory holding another roofline package")
    args = parser.parse_args()
    variants = [("this tree", None)] + ([(f"baseline {args.baseline_src}", args.baseline_src)]
                                        if args.baseline_src else [])
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}, threads {args.threads or 'CLI default'}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    commands = [("roofline generate --prompt Hi --max-tokens 1", run_generate, [("teardown", "teardown"), ("exit (total)", "total")]),
                ("roofline serve", run_serve, [("/health 200", "health"), ("1st completion", "total")])]
    if args.only == "ray":
        rows = [run_ray(args.model, args.threads) for _ in range(args.runs)]
        med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
        runs = ", ".join(f"{r['from_zero']:.2f}" for r in rows)
        print(f"roofline serve --backend ray --autoscale 0,1 (median of {len(rows)}): spawn -> first answer "
              f"{med('total'):.2f} s; first answer after scaling to zero {med('from_zero'):.2f} s; warm "
              f"{med('warm'):.3f} s; runs from zero: {runs}")
        commands = []
    for title, run, extra in commands:
        if args.only not in (None, title.split()[1]):
            continue
        rows: dict[str, list[dict[str, float]]] = {label: [] for label, _ in variants}
        for _ in range(args.runs):
            for label, src in variants:
                rows[label].append(run(args.model, args.threads, src))
        for label, _ in variants:
            print(_table(f"{title} [{label}]", rows[label], extra))
        if len(variants) == 2:
            med = {label: (statistics.median(r["total"] for r in rs), statistics.median(r["cpu_total"] for r in rs))
                   for label, rs in rows.items()}
            (_, (new_wall, new_cpu)), (_, (old_wall, old_cpu)) = med.items()
            print(f"  this tree / baseline: wall {new_wall / old_wall:.2f}x, cpu {new_cpu / old_cpu:.2f}x")
    print(f"# load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
