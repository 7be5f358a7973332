"""Engine replicas as child `roofline serve` processes: start, health-check, restart with backoff, stop.

Each replica is a normal `roofline serve` bound to a free loopback port. Children die with the parent
however it ends (PR_SET_PDEATHSIG on Linux, so even a SIGKILL of the parent leaves no orphan) and sit
in their own process group, so a terminal's Ctrl-C reaches only the parent, which drains and then
stops them. Children are spawned from the event-loop thread only: the death signal follows the thread
that forked, and a worker thread that exits would take its children with it.
"""

from __future__ import annotations

import asyncio
import ctypes
import enum
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from roofline.errors import ConfigError
from roofline.parallel.router import Router

logger = logging.getLogger("roofline.parallel")

_PR_SET_PDEATHSIG = 1
EXIT_USAGE = 2  # the CLI's exit status for a user error
LOOPBACK = "127.0.0.1"


class ReplicaState(enum.Enum):
    """Where a replica is in its life."""

    STARTING = "starting"  # process launched, /health not yet ok
    HEALTHY = "healthy"  # /health ok: routable
    UNHEALTHY = "unhealthy"  # process alive but /health failing: not routable, killed if it lasts
    DEAD = "dead"  # process gone: restarted after the backoff
    STOPPED = "stopped"  # stopped on purpose (shutdown): never restarted


@dataclass(frozen=True)
class SupervisorConfig:
    """Timings of health checks and restarts."""

    health_interval_s: float = 0.25  # between health checks (and process polls) of every replica
    health_timeout_s: float = 2.0  # one /health request
    start_timeout_s: float = 600.0  # a replica not healthy this long after launch is killed (--compile is slow)
    unhealthy_kill_s: float = 20.0  # a once-healthy replica failing /health this long is killed (hung)
    restart_backoff_s: float = 0.5  # first restart delay; doubles per crash in a row
    max_restart_backoff_s: float = 30.0  # the delay stops growing here
    stable_after_s: float = 30.0  # healthy this long: the crash streak (and backoff) resets
    stop_timeout_s: float = 10.0  # after SIGTERM at shutdown, then SIGKILL

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ConfigError(f"replicas: {name} must be > 0, got {value}")


@dataclass
class Replica:
    """One child engine process and what the supervisor knows of it."""

    index: int
    state: ReplicaState = ReplicaState.DEAD
    process: subprocess.Popen | None = None
    port: int | None = None
    num_restarts: int = 0  # launches after the first
    num_crashes_in_row: int = 0  # for the backoff
    launched_at: float = 0.0
    healthy_since: float | None = None
    failing_since: float | None = None  # first failed /health since the last good one
    next_launch_at: float = 0.0

    @property
    def url(self) -> str:
        """Base URL of the replica's server."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self.process.pid if self.process is not None and self.process.poll() is None else None


def free_port() -> int:
    """A loopback port free right now (the child binds it a moment later; a lost race is a crash and a retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _die_with_parent(parent_pid: int) -> None:
    """In the child before exec: get SIGKILL when the parent dies; exit if it already has."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


class ReplicaSupervisor:
    """Launches N replicas, keeps the router's routable set in step with their health, restarts the dead."""

    def __init__(self, num_replicas: int, command: Callable[[int], list[str]], env: dict[str, str],
                 router: Router, config: SupervisorConfig | None = None) -> None:
        self.command = command  # port -> argv of one replica
        self.env = env
        self.router = router
        self.config = config or SupervisorConfig()
        self.replicas = [Replica(i) for i in range(num_replicas)]
        self.is_stopping = False
        self.fatal_error: str | None = None  # set when replicas cannot start at all; on_fatal then runs
        self.on_fatal: Callable[[], None] = lambda: None
        self.has_been_healthy = False  # any replica, ever: after that, exits are crashes to restart
        self._parent_pid = os.getpid()
        self._client = httpx.AsyncClient(timeout=self.config.health_timeout_s)

    @property
    def num_healthy(self) -> int:
        """Replicas taking work now."""
        return sum(r.state is ReplicaState.HEALTHY for r in self.replicas)

    def launch(self, replica: Replica) -> None:
        """Start (or restart) a replica's process on a fresh free port."""
        if os.getpid() != self._parent_pid:
            raise RuntimeError("replicas must be launched by the process that owns the supervisor")
        if replica.process is not None:
            replica.num_restarts += 1
        replica.port = free_port()
        replica.process = subprocess.Popen(self.command(replica.port), env=self.env, stdin=subprocess.DEVNULL,
                                           preexec_fn=functools.partial(_die_with_parent, self._parent_pid), process_group=0)
        replica.state = ReplicaState.STARTING
        replica.launched_at = time.monotonic()
        replica.healthy_since = replica.failing_since = None
        logger.info("replica %d: started pid %d on port %d", replica.index, replica.process.pid, replica.port)

    def start_all(self) -> None:
        """Launch every replica."""
        for replica in self.replicas:
            self.launch(replica)

    def _set_state(self, replica: Replica, state: ReplicaState) -> None:
        replica.state = state
        self.router.set_routable(replica.index, state is ReplicaState.HEALTHY)

    def _on_exit(self, replica: Replica, now: float) -> None:
        code = replica.process.returncode if replica.process is not None else None
        if code == EXIT_USAGE and not self.has_been_healthy:  # a bad flag or model: every restart would fail alike
            self.fatal_error = (f"replica {replica.index} exited at start-up with a usage error (its message is "
                                f"above); fix the serve flags")
            self._set_state(replica, ReplicaState.STOPPED)
            self.on_fatal()
            return
        stable = replica.healthy_since is not None and now - replica.healthy_since >= self.config.stable_after_s
        replica.num_crashes_in_row = 1 if stable else replica.num_crashes_in_row + 1
        delay = min(self.config.max_restart_backoff_s,
                    self.config.restart_backoff_s * 2 ** (replica.num_crashes_in_row - 1))
        replica.next_launch_at = now + delay
        self._set_state(replica, ReplicaState.DEAD)
        logger.warning("replica %d: exited (code %s); restarting in %.1f s", replica.index, code, delay)

    def report_failure(self, index: int) -> None:
        """A request could not reach the replica: take it out of routing until /health passes again."""
        replica = self.replicas[index]
        if replica.state is ReplicaState.HEALTHY:
            replica.failing_since = time.monotonic()
            self._set_state(replica, ReplicaState.UNHEALTHY)

    async def _is_healthy(self, replica: Replica) -> bool:
        try:
            resp = await self._client.get(f"{replica.url}/health")
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    async def check(self, replica: Replica) -> None:
        """One round for one replica: notice an exit, relaunch after the backoff, probe /health."""
        now = time.monotonic()
        if self.is_stopping or replica.state is ReplicaState.STOPPED:
            return
        if replica.state is ReplicaState.DEAD:
            if now >= replica.next_launch_at:
                self.launch(replica)
            return
        if replica.process is None or replica.process.poll() is not None:
            self._on_exit(replica, now)
            return
        if await self._is_healthy(replica):
            if replica.state is not ReplicaState.HEALTHY:
                replica.healthy_since = time.monotonic()
                self.has_been_healthy = True
                logger.info("replica %d: healthy", replica.index)
            replica.failing_since = None
            self._set_state(replica, ReplicaState.HEALTHY)
            return
        if replica.state is ReplicaState.STARTING:
            if now - replica.launched_at > self.config.start_timeout_s:
                logger.warning("replica %d: not healthy %.0f s after start; killing it", replica.index,
                               self.config.start_timeout_s)
                replica.process.kill()
            return
        if replica.failing_since is None:
            replica.failing_since = now
        self._set_state(replica, ReplicaState.UNHEALTHY)
        if now - replica.failing_since > self.config.unhealthy_kill_s:
            logger.warning("replica %d: /health failing for %.0f s; killing it", replica.index,
                           now - replica.failing_since)
            replica.process.kill()

    async def monitor(self) -> None:
        """Forever (until stopped): check every replica each interval."""
        while not self.is_stopping and self.fatal_error is None:
            await asyncio.gather(*(self.check(r) for r in self.replicas))
            await asyncio.sleep(self.config.health_interval_s)

    async def wait_routable(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for at least one healthy replica."""
        deadline = time.monotonic() + timeout_s
        while self.num_healthy == 0:
            if self.is_stopping or time.monotonic() >= deadline:
                return False
            await asyncio.sleep(min(self.config.health_interval_s, 0.1))
        return True

    def stop(self) -> None:
        """Stop every replica: SIGTERM (they drain, though nothing should be in flight by now), then SIGKILL."""
        self.is_stopping = True
        running = [r for r in self.replicas if r.process is not None and r.process.poll() is None]
        for replica in running:
            replica.process.terminate()
        deadline = time.monotonic() + self.config.stop_timeout_s
        for replica in running:
            try:
                replica.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                replica.process.kill()
                replica.process.wait()
        for replica in self.replicas:
            self._set_state(replica, ReplicaState.STOPPED)

    async def aclose(self) -> None:
        """Close the health-check client."""
        await self._client.aclose()


@dataclass
class ReplicaLaunch:
    """How to start one replica: the `roofline serve` arguments beyond host and port, and its environment."""

    serve_args: list[str]  # engine and server flags forwarded from the parent's command line
    num_threads: int  # CPU threads of each replica
    internal_api_key: str  # the only key replicas accept; the front end checks the clients' keys
    extra_env: dict[str, str] = field(default_factory=dict)

    def argv(self, port: int) -> list[str]:
        """The child's command line."""
        return [sys.executable, "-m", "roofline.cli", "serve", *self.serve_args, "--host", LOOPBACK,
                "--port", str(port), "--threads", str(self.num_threads)]

    def env(self) -> dict[str, str]:
        """The child's environment: the parent's, with threads split and the internal key as the only key."""
        env = {**os.environ, **self.extra_env}
        env["OMP_NUM_THREADS"] = env["ROOFLINE_NUM_THREADS"] = str(self.num_threads)
        env["ROOFLINE_API_KEY"] = self.internal_api_key
        return env
