"""`roofline serve`: load the model, start the engine thread, and run the app under uvicorn with draining."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

from roofline import engine_args
from roofline.engine_args import served_model_name
from roofline.errors import RooflineError
from roofline.server.context import DrainState

logger = logging.getLogger("roofline.server")

DEFAULT_MAX_QUEUE = 256
_GRACE_AFTER_DRAIN_S = 2.0  # uvicorn's own wait for connections once the drain is over
_ANSWER_CANCELLED_S = 2.0  # longest wait, after the drain deadline, for the cancelled requests' answers to go out


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM or SIGINT drains instead of stopping.

    Draining: new API requests get 503, /health reports "draining", in-flight requests run to the end
    (up to `drain_timeout_s`), then the server stops and the process exits 0. A second signal stops at
    once. uvicorn's default would re-raise the signal after shutdown, so the exit status would not be 0.
    """

    def __init__(self, config: uvicorn.Config, drain: DrainState, drain_timeout_s: float,
                 cancel_in_flight: Callable[[str], int] | None = None) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_timeout_s = drain_timeout_s
        self.drain_deadline: float | None = None
        # at the deadline: end every request still in flight with an error (streams get an error event and
        # [DONE], others a 503), then give the answers a moment to go out before stopping
        self.cancel_in_flight = cancel_in_flight
        self.cancelled_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: start draining; second: stop now."""
        if self.drain_deadline is None:
            self.drain.is_draining = True
            self.drain_deadline = time.monotonic() + self.drain_timeout_s
            logger.warning("%s: draining %d request(s) in flight (up to %.0f s); signal again to stop now",
                           signal.Signals(sig).name, self.drain.num_in_flight, self.drain_timeout_s)
        else:
            self.should_exit = True
            self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        """Stop once the drain is over: nothing in flight, or the timeout passed."""
        if self.drain_deadline is not None and not self.should_exit:
            if self.drain.num_in_flight == 0:
                self.should_exit = True
            elif self.cancelled_at is not None:
                if time.monotonic() >= self.cancelled_at + _ANSWER_CANCELLED_S:
                    self.should_exit = True
            elif time.monotonic() >= self.drain_deadline:
                logger.warning("drain timeout: ending %d request(s) still in flight with an error",
                               self.drain.num_in_flight)
                if self.cancel_in_flight is not None:
                    self.cancel_in_flight("the server is shutting down (drain timeout); retry on another server")
                    self.cancelled_at = time.monotonic()
                else:
                    self.should_exit = True
        return await super().on_tick(counter)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_port(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port, for uvicorn to listen on; a port in use is a one-line RooflineError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto given, not left 0: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and
    # without it every answer on a kept-alive connection waited ~40 ms (Nagle against delayed ACKs)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: rebind at once after a restart
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise RooflineError(f"port {port} on {host} is already in use; stop what holds it or choose "
                                f"another --port") from None
        raise RooflineError(f"cannot listen on {host} port {port}: {exc.strerror or exc}; check --host and "
                            f"--port") from None
    return sock


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in [0, 65535] (0: any free port), got {port}")
    return port


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def observability(args: argparse.Namespace):
    """(RequestTracer | None, ProfilingConfig | None) as the flags ask; a bad flag or missing package: RooflineError."""
    from roofline.server.profiling import ProfilingConfig, profile_dir
    from roofline.server.tracing import RequestTracer

    if getattr(args, "data_parallel_size", 1) > 1 and (args.otlp_traces_endpoint or args.enable_profiling):
        raise RooflineError("--otlp-traces-endpoint and --enable-profiling work on one engine for now; leave out "
                            "--data-parallel-size")
    if args.profile_dir is not None and not args.enable_profiling:
        raise RooflineError("--profile-dir needs --enable-profiling")
    tracer = RequestTracer.to_otlp(args.otlp_traces_endpoint) if args.otlp_traces_endpoint else None
    profiling = ProfilingConfig(profile_dir(args.profile_dir)) if args.enable_profiling else None
    return tracer, profiling


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT, then drain and exit 0."""
    tracer, profiling = observability(args)  # before the model loads: a missing package fails at once
    if getattr(args, "backend", "local") == "ray":  # engines in Ray Serve replicas
        from roofline.parallel.ray_app import cmd_serve_ray

        return cmd_serve_ray(args)
    if getattr(args, "num_replicas", None) is not None or getattr(args, "autoscale", None) is not None:
        raise RooflineError("--num-replicas and --autoscale need --backend ray; on one machine use "
                            "--data-parallel-size N")
    if getattr(args, "data_parallel_size", 1) > 1:  # replicas in child processes behind a router
        from roofline.parallel.serve import cmd_serve_data_parallel

        return cmd_serve_data_parallel(args)
    from roofline.engine.async_engine import AsyncEngine
    from roofline.server.app import create_app
    from roofline.server.config import ServerConfig

    keys = list(args.api_key)
    if os.environ.get("ROOFLINE_API_KEY"):
        keys.append(os.environ["ROOFLINE_API_KEY"])
    from roofline.server.slo import parse_slo_class, parse_tenant, tenant_weights

    classes = {c.name: c for c in map(parse_slo_class, args.slo_class)}
    tenants = dict(map(parse_tenant, args.tenant))
    config = ServerConfig(model_name=args.served_model_name or served_model_name(args.model),
                          model_aliases=("default", args.model), api_keys=tuple(keys),
                          max_body_bytes=args.max_body_size, drain_timeout_s=args.drain_timeout,
                          slo_classes=classes, tenants=tenants)
    args.tenant_weights = tenant_weights(tenants, bool(keys))
    if not keys and not _is_loopback(args.host):
        logger.warning("listening on %s with no API key: anyone who can reach it may use it "
                       "(set --api-key or $ROOFLINE_API_KEY)", args.host)
    with bind_port(args.host, args.port) as sock:  # before the model loads (slow), so a taken port fails at once
        llm = engine_args.make_llm(args)
        engine = AsyncEngine(llm.engine, max_queue=args.max_queue)
        try:
            app = create_app(engine, config, tracer=tracer, profiling=profiling)
            uv_config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=_GRACE_AFTER_DRAIN_S,
                                       access_log=args.access_log)
            server = DrainingServer(uv_config, app.state.ctx.drain, args.drain_timeout, engine.cancel_all)
            print(f"roofline: serving {config.model_name} on http://{args.host}:{sock.getsockname()[1]}/v1 "
                  f"(context {llm.engine.max_model_len} tokens)", flush=True)
            url = f"http://{args.host}:{sock.getsockname()[1]}"
            print(f"roofline: playground {url}/ , engine dashboard {url}/dashboard", flush=True)
            if profiling is not None:
                print(f"roofline: profiling on: POST /debug/profile?steps=N writes traces to {profiling.profile_dir}",
                      flush=True)
            server.run(sockets=[sock])
        finally:
            engine.shutdown()
            if tracer is not None:
                tracer.shutdown()  # sends the spans still buffered
    return 0


def add_serve_parser(subparsers) -> None:
    """Register `serve` on the CLI's subparsers."""
    from roofline.server.config import DEFAULT_MAX_BODY_BYTES

    p = subparsers.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                              description="Serve the OpenAI-compatible HTTP API (/v1/completions, "
                                          "/v1/chat/completions, /v1/models, /health, /metrics, /openapi.json).")
    engine_args.add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--slo-class", action="append", default=[], metavar="NAME=ttft:1s,tpot:100ms,priority:0",
                   help="a latency class requests (slo_class) or tenants can name; repeatable (docs/scheduling.md)")
    p.add_argument("--tenant", action="append", default=[], metavar="NAME=weight:2,class:NAME",
                   help="a tenant's fair-share weight and default class; NAME is an API key when the server has "
                        "keys, else a request's `user`; repeatable")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accept this bearer key on /v1 (repeatable; also $ROOFLINE_API_KEY); none: no auth")
    p.add_argument("--max-queue", type=_count, default=DEFAULT_MAX_QUEUE,
                   help=f"requests allowed to wait; more get 429 (default {DEFAULT_MAX_QUEUE})")
    p.add_argument("--served-model-name", default=None,
                   help="model id in responses (default: the --model value; 'default' -> the model's name)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may run after SIGTERM (default 30)")
    p.add_argument("--max-body-size", type=engine_args.parse_bytes, default=DEFAULT_MAX_BODY_BYTES,
                   help="largest request body, e.g. 4MiB (default)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--otlp-traces-endpoint", default=None, metavar="URL",
                   help="send an OpenTelemetry span per chat/completion request (queue, prefill, decode) over "
                        "OTLP/HTTP, e.g. http://localhost:4318/v1/traces (needs pip install 'roofline[otel]')")
    p.add_argument("--enable-profiling", action="store_true",
                   help="serve POST /debug/profile?steps=N: a torch profiler trace of the next N engine steps")
    p.add_argument("--profile-dir", default=None, metavar="DIR",
                   help="where /debug/profile writes traces (default: a new temporary folder)")
    p.add_argument("--data-parallel-size", type=_count, default=1, metavar="N",
                   help="N engine replicas, each its own process, behind one router (default 1: one engine in "
                        "this process); --threads is then per replica (default: cores // N)")
    from roofline.parallel.ray_app import parse_autoscale

    p.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="local: engines in this machine's processes; ray: engines in Ray Serve replicas, on the "
                        "cluster at $RAY_ADDRESS or a local Ray (needs pip install 'roofline[ray]')")
    p.add_argument("--num-replicas", type=_count, default=None, metavar="N",
                   help="--backend ray: a fixed number of engine replicas (default 1)")
    p.add_argument("--autoscale", type=parse_autoscale, default=None, metavar="MIN,MAX",
                   help="--backend ray: scale replicas on ongoing requests between MIN and MAX; MIN 0 scales to "
                        "zero when idle (the next request waits for a replica)")
    p.add_argument("--idle-timeout", type=float, default=60.0, metavar="S",
                   help="--backend ray with --autoscale: seconds below target before scaling down (default 60)")
    p.set_defaults(func=cmd_serve)
