"""ReplicaSupervisor on stand-in children (a few lines of Python each): health, restarts, backoff, stop, no orphans."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import roofline.parallel

from roofline.parallel.replicas import ReplicaLaunch, ReplicaState, ReplicaSupervisor, SupervisorConfig
from roofline.parallel.router import Router

# answers GET /health with 200 on the port it is given, like a replica that is up
HEALTHY_CHILD = textwrap.dedent("""
    import sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *args):
            pass
    HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")
FAST = SupervisorConfig(health_interval_s=0.02, restart_backoff_s=0.05, max_restart_backoff_s=0.2,
                        stop_timeout_s=2.0, health_timeout_s=1.0)


def python_child(code: str):
    return lambda port: [sys.executable, "-c", code, str(port)]


def until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


async def check_until(supervisor: ReplicaSupervisor, predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.gather(*(supervisor.check(r) for r in supervisor.replicas))
        await asyncio.sleep(0.01)


def test_a_healthy_replica_is_routable_and_a_killed_one_is_restarted():
    async def scenario() -> None:
        router = Router(2)
        supervisor = ReplicaSupervisor(2, python_child(HEALTHY_CHILD), dict(os.environ), router, FAST)
        supervisor.start_all()
        try:
            await check_until(supervisor, lambda: supervisor.num_healthy == 2)
            assert all(load.is_routable for load in router.loads)
            victim = supervisor.replicas[1]
            old_pid = victim.pid
            os.kill(old_pid, signal.SIGKILL)
            await check_until(supervisor, lambda: victim.state is ReplicaState.DEAD)
            assert not router.loads[1].is_routable and router.loads[0].is_routable
            await check_until(supervisor, lambda: victim.state is ReplicaState.HEALTHY)
            assert victim.num_restarts == 1 and victim.pid != old_pid and victim.port is not None
            assert router.loads[1].is_routable
            assert supervisor.replicas[0].num_restarts == 0
        finally:
            supervisor.stop()
            await supervisor.aclose()

    asyncio.run(scenario())


def test_a_crash_loop_backs_off_exponentially():
    async def scenario() -> None:
        config = SupervisorConfig(health_interval_s=0.02, restart_backoff_s=0.05, max_restart_backoff_s=0.15)
        supervisor = ReplicaSupervisor(1, python_child("raise SystemExit(1)"), dict(os.environ), Router(1), config)
        replica = supervisor.replicas[0]
        supervisor.start_all()
        delays = []
        try:
            for _ in range(4):
                replica.process.wait()
                await supervisor.check(replica)
                assert replica.state is ReplicaState.DEAD
                delays.append(round(replica.next_launch_at - time.monotonic(), 2))
                await check_until(supervisor, lambda: replica.state is ReplicaState.STARTING)
        finally:
            supervisor.stop()
            await supervisor.aclose()
        assert replica.num_restarts == 4
        assert delays[0] <= 0.05 < delays[1] <= 0.1 < delays[2] <= 0.15 and delays[3] <= 0.15  # capped

    asyncio.run(scenario())


def test_a_usage_error_at_start_up_is_fatal_not_a_crash_loop():
    async def scenario() -> None:
        supervisor = ReplicaSupervisor(2, python_child("raise SystemExit(2)"), dict(os.environ), Router(2), FAST)
        called = []
        supervisor.on_fatal = lambda: called.append(True)
        supervisor.start_all()
        try:
            for replica in supervisor.replicas:
                replica.process.wait()
            await supervisor.check(supervisor.replicas[0])
            assert supervisor.fatal_error is not None and "usage error" in supervisor.fatal_error and called
            assert supervisor.replicas[0].state is ReplicaState.STOPPED
            await asyncio.wait_for(supervisor.monitor(), 1.0)  # returns at once: nothing more to supervise
            assert supervisor.replicas[0].num_restarts == 0
        finally:
            supervisor.stop()
            await supervisor.aclose()

    asyncio.run(scenario())


def test_stop_terminates_every_child():
    supervisor = ReplicaSupervisor(2, python_child("import time; time.sleep(60)"), dict(os.environ), Router(2), FAST)
    supervisor.start_all()
    processes = [r.process for r in supervisor.replicas]
    supervisor.stop()
    assert all(p.poll() is not None for p in processes)
    assert all(r.state is ReplicaState.STOPPED for r in supervisor.replicas)
    asyncio.run(supervisor.aclose())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_children_die_when_the_parent_is_killed():
    # the package's __init__ imports torch (seconds); the supervisor needs none of it, so bypass it
    parent_code = textwrap.dedent(f"""
        import os, sys, time, types
        package = types.ModuleType("roofline")
        package.__path__ = [{os.path.dirname(roofline.parallel.__path__[0])!r}]
        sys.modules["roofline"] = package
        from roofline.parallel.replicas import ReplicaSupervisor
        from roofline.parallel.router import Router
        sup = ReplicaSupervisor(2, lambda port: [sys.executable, "-c", "import time; time.sleep(60)"],
                                dict(os.environ), Router(2))
        sup.start_all()
        print(" ".join(str(r.pid) for r in sup.replicas), "torch" in sys.modules, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    try:
        *pids, torch_imported = parent.stdout.readline().split()
        child_pids = [int(p) for p in pids]
        assert len(child_pids) == 2 and torch_imported == "False"
        parent.kill()  # SIGKILL: no chance to clean up, so only the death signal can end the children
        parent.wait()

        def gone(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        until(lambda: all(gone(pid) for pid in child_pids), 5.0)
    finally:
        parent.kill()
        parent.stdout.close()


def test_the_launch_splits_threads_and_gives_only_the_internal_key(monkeypatch):
    monkeypatch.setenv("ROOFLINE_API_KEY", "a-client-key")
    launch = ReplicaLaunch(["--model", "m"], num_threads=3, internal_api_key="internal")
    argv = launch.argv(4321)
    assert argv[1:4] == ["-m", "roofline.cli", "serve"]
    assert argv[argv.index("--port") + 1] == "4321" and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--threads") + 1] == "3"
    env = launch.env()
    assert env["OMP_NUM_THREADS"] == "3" and env["ROOFLINE_API_KEY"] == "internal"
