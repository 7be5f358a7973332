"""`roofline serve --data-parallel-size N`: N replica processes behind one front end, drained on SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import secrets

import uvicorn

from roofline.errors import RooflineError

logger = logging.getLogger("roofline.parallel")

# flags the front end keeps for itself (or sets per replica); every other serve flag is passed to each replica
_FRONT_END_DESTS = {"help", "host", "port", "api_key", "data_parallel_size", "threads", "access_log",
                    "served_model_name", "func", "command", "verbose", "backend", "num_replicas", "autoscale",
                    "idle_timeout"}
_GRACE_AFTER_DRAIN_S = 2.0


def serve_parser() -> argparse.ArgumentParser:
    """The `serve` subcommand's parser, as the CLI builds it (so flags added later are forwarded too)."""
    from roofline.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices["serve"]
    raise RuntimeError("the CLI has no serve command")


def _text(value: object) -> str:
    return "none" if value is None else str(value)  # None only ever stands for a flag's 'none' spelling


def replica_serve_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The serve flags, as given to the parent, that each replica takes too (defaults left out)."""
    argv: list[str] = []
    for action in parser._actions:
        if action.dest in _FRONT_END_DESTS or not action.option_strings or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for item in value:
                argv += [flag, _text(item)]
        else:
            argv += [flag, _text(value)]
    return argv


def threads_per_replica(num_replicas: int, threads: int | None) -> int:
    """--threads when given (it is per replica), else this process's cores split evenly, at least 1."""
    if threads is not None:
        return threads
    num_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, num_cores // num_replicas)


def cmd_serve_data_parallel(args: argparse.Namespace) -> int:
    """Serve N replicas behind the router until SIGTERM/SIGINT, then drain, stop the replicas and exit 0."""
    from roofline.loaders import open_model
    from roofline.parallel.app import create_router_app
    from roofline.parallel.metrics import RouterMetrics
    from roofline.parallel.proxy import ReplicaProxy, RouterContext
    from roofline.parallel.replicas import ReplicaLaunch, ReplicaSupervisor
    from roofline.parallel.router import Router
    from roofline.engine_args import served_model_name
    from roofline.server.commands import DrainingServer, bind_port
    from roofline.server.config import ServerConfig

    num_replicas = args.data_parallel_size
    open_model(args.model).model_config()  # a missing or unreadable model: one line now, not N crash loops
    keys = list(args.api_key)
    if os.environ.get("ROOFLINE_API_KEY"):
        keys.append(os.environ["ROOFLINE_API_KEY"])
    config = ServerConfig(model_name=args.served_model_name or served_model_name(args.model),
                          model_aliases=("default", args.model), api_keys=tuple(keys),
                          max_body_bytes=args.max_body_size, drain_timeout_s=args.drain_timeout)
    internal_key = secrets.token_urlsafe(32)  # replicas accept only this: their ports cannot bypass the keys
    num_threads = threads_per_replica(num_replicas, args.threads)
    launch = ReplicaLaunch(replica_serve_args(args, serve_parser()) + ["--served-model-name", config.model_name],
                           num_threads, internal_key)
    router = Router(num_replicas)
    supervisor = ReplicaSupervisor(num_replicas, launch.argv, launch.env(), router)
    metrics = RouterMetrics(router, supervisor, internal_key)
    proxy = ReplicaProxy(router, supervisor, metrics, internal_key)
    ctx = RouterContext(config, metrics)
    with bind_port(args.host, args.port) as sock:
        app = create_router_app(proxy, supervisor, ctx)
        uv_config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=_GRACE_AFTER_DRAIN_S,
                                   access_log=args.access_log)
        server = DrainingServer(uv_config, ctx.drain, args.drain_timeout, proxy.cancel_all)
        supervisor.on_fatal = lambda: setattr(server, "should_exit", True)
        supervisor.start_all()
        try:
            print(f"roofline: serving {config.model_name} on http://{args.host}:{sock.getsockname()[1]}/v1 "
                  f"with {num_replicas} replicas ({num_threads} threads each)", flush=True)
            server.run(sockets=[sock])
        finally:
            supervisor.stop()
    if supervisor.fatal_error is not None:
        raise RooflineError(supervisor.fatal_error)
    return 0
