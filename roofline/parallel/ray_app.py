"""`roofline serve --backend ray`: the same OpenAI app, one engine per Ray Serve replica.

Each replica builds what `roofline serve` builds (the LLM, an AsyncEngine, create_app) from the same
flags, and Ray Serve's HTTP proxy hands it every request, which it runs through that app as plain
ASGI, so routes, errors, keys and streams are exactly the single-engine server's. Ray places the
replicas (on this machine or a cluster at $RAY_ADDRESS), restarts one that dies or fails its health
check, and with `--autoscale MIN,MAX` scales on ongoing requests; MIN 0 scales to zero after
`--idle-timeout` seconds, and the first request after that waits in Ray's proxy for a new replica.
Ray is an optional extra (`pip install 'roofline[ray]'`), imported only here.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from roofline.errors import ConfigError

logger = logging.getLogger("roofline.parallel")
DEPLOYMENT_NAME = "RooflineEngine"
# "0": Ray's single-machine mode, in which a local Ray binds and talks on loopback only (its name is Ray's)
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
APP_NAME = "roofline"


@dataclass(frozen=True)
class RayServeOptions:
    """How many engine replicas Ray Serve runs, and when it scales them."""

    num_replicas: int | None = 1  # a fixed count; None: autoscale between min and max
    min_replicas: int = 1  # autoscaling floor; 0 scales to zero when idle
    max_replicas: int = 1  # autoscaling ceiling
    target_ongoing_requests: int = 8  # per replica, before Ray adds one
    idle_timeout_s: float = 60.0  # scale down (to zero too) after this long below target
    num_cpus: float = 1.0  # Ray CPUs each replica reserves
    look_back_period_s: float = 30.0  # load averaged over this long (must exceed Ray's metrics push interval)

    def __post_init__(self) -> None:
        if self.num_replicas is not None and self.num_replicas < 1:
            raise ConfigError(f"--num-replicas must be >= 1, got {self.num_replicas}")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ConfigError(f"--autoscale MIN,MAX needs 0 <= MIN <= MAX and MAX >= 1, got "
                              f"{self.min_replicas},{self.max_replicas}")
        if self.idle_timeout_s <= 0 or self.target_ongoing_requests < 1 or self.num_cpus <= 0:
            raise ConfigError("ray: idle timeout, target ongoing requests and CPUs per replica must be positive")

    def deployment_options(self) -> dict:
        """Keyword arguments for `serve.deployment`."""
        options: dict = {"name": DEPLOYMENT_NAME, "ray_actor_options": {"num_cpus": self.num_cpus},
                         "max_ongoing_requests": max(64, 2 * self.target_ongoing_requests),
                         "health_check_period_s": 2.0, "graceful_shutdown_timeout_s": 30.0}
        if self.num_replicas is not None:
            options["num_replicas"] = self.num_replicas
        else:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": max(1, self.min_replicas),
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": 0.0, "downscale_delay_s": self.idle_timeout_s,
                "downscale_to_zero_delay_s": self.idle_timeout_s, "look_back_period_s": self.look_back_period_s}
        return options


class RooflineReplica:
    """One Ray Serve replica: the single-engine server, called as ASGI for each request."""

    def __init__(self, serve_args: list[str], api_keys: tuple[str, ...]) -> None:
        from roofline.engine.async_engine import AsyncEngine
        from roofline.engine_args import make_llm, served_model_name
        from roofline.parallel.serve import serve_parser
        from roofline.server.app import create_app
        from roofline.server.config import ServerConfig

        args = serve_parser().parse_args(serve_args)
        self.engine = AsyncEngine(make_llm(args).engine, max_queue=args.max_queue)
        config = ServerConfig(model_name=args.served_model_name or served_model_name(args.model),
                              model_aliases=("default", args.model), api_keys=api_keys,
                              max_body_bytes=args.max_body_size, drain_timeout_s=args.drain_timeout)
        self.app = create_app(self.engine, config)

    async def __call__(self, request):
        """Run the request through the app; the answer streams back as the app sends it."""
        from starlette.responses import StreamingResponse

        messages: asyncio.Queue = asyncio.Queue()
        task = asyncio.create_task(self.app(request.scope, request.receive, messages.put))
        start = await messages.get()
        if start["type"] != "http.response.start":  # the app failed before answering: its own 500 went nowhere
            raise RuntimeError(f"unexpected ASGI message {start['type']}")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.get("headers", [])}
        headers.pop("content-length", None)  # the proxy re-frames the body

        async def body():
            try:
                while True:
                    message = await messages.get()
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body", False):
                        break
                await task
            finally:
                if not task.done():  # the client left: the app's disconnect handling aborts the request
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

        return StreamingResponse(body(), status_code=start["status"], headers=headers,
                                 media_type=headers.get("content-type"))

    def check_health(self) -> None:
        """Ray's health check: a replica whose engine thread stopped is replaced."""
        if not self.engine.is_alive():
            raise RuntimeError("the engine thread stopped")


def build_app(serve_args: list[str], api_keys: tuple[str, ...], options: RayServeOptions):
    """The Ray Serve application: one deployment of RooflineReplica with `options`."""
    from ray import serve

    deployment = serve.deployment(**options.deployment_options())(RooflineReplica)
    return deployment.bind(serve_args, api_keys)


def app_builder(args: dict):
    """The application for Ray's config files (KubeRay's serveConfigV2, `serve run`), from its `args`.

    args: model (default "default"), serve_args (more `roofline serve` flags), num_replicas, or
    min_replicas and max_replicas to autoscale, idle_timeout_s, look_back_period_s, num_cpus.
    API keys: $ROOFLINE_API_KEY.
    """
    import os

    scaled = "min_replicas" in args or "max_replicas" in args
    options = RayServeOptions(
        num_replicas=None if scaled else int(args.get("num_replicas", 1)),
        min_replicas=int(args.get("min_replicas", 1)), max_replicas=int(args.get("max_replicas", 1)),
        idle_timeout_s=float(args.get("idle_timeout_s", 60.0)), num_cpus=float(args.get("num_cpus", 1.0)),
        look_back_period_s=float(args.get("look_back_period_s", 30.0)))
    serve_args = ["--model", str(args.get("model", "default")), "--threads", str(max(1, int(options.num_cpus))),
                  *map(str, args.get("serve_args", []))]
    keys = (os.environ["ROOFLINE_API_KEY"],) if os.environ.get("ROOFLINE_API_KEY") else ()
    return build_app(serve_args, keys, options)


def parse_autoscale(text: str) -> tuple[int, int]:
    """`--autoscale MIN,MAX` -> (MIN, MAX)."""
    import argparse

    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (two integers, e.g. 0,4), got {text!r}") from None
    if not 0 <= low <= high or high < 1:
        raise argparse.ArgumentTypeError(f"needs 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return low, high


def ray_options(args) -> RayServeOptions:
    """RayServeOptions from the serve flags (--num-replicas, --autoscale, --idle-timeout, --threads)."""
    if getattr(args, "data_parallel_size", 1) > 1:
        raise ConfigError("--backend ray takes --num-replicas N or --autoscale MIN,MAX, not --data-parallel-size")
    num_cpus = float(args.threads or 1)
    if args.autoscale is not None:
        if args.num_replicas is not None:
            raise ConfigError("give --num-replicas or --autoscale, not both")
        low, high = args.autoscale
        return RayServeOptions(num_replicas=None, min_replicas=low, max_replicas=high,
                               idle_timeout_s=args.idle_timeout, num_cpus=num_cpus)
    return RayServeOptions(num_replicas=args.num_replicas or 1, num_cpus=num_cpus)


def cmd_serve_ray(args) -> int:
    """Serve through Ray Serve (at $RAY_ADDRESS, else a local Ray) until SIGTERM/SIGINT, then drain and exit 0."""
    import os
    import signal
    import threading

    from roofline.errors import RooflineError
    from roofline.loaders import open_model
    from roofline.parallel.serve import replica_serve_args, serve_parser
    from roofline.engine_args import served_model_name
    from roofline.server.commands import bind_port

    address = os.environ.get("RAY_ADDRESS") or None
    if address is None:  # a local instance keeps to loopback, as every roofline server does; read at import
        os.environ.setdefault(LOOPBACK_ONLY_ENV, "0")
    try:
        import ray
        from ray import serve
    except ImportError:
        raise RooflineError("--backend ray needs Ray Serve: pip install 'roofline[ray]'") from None
    options = ray_options(args)
    open_model(args.model).model_config()  # a missing model: one line now, not a replica crash loop in Ray
    bind_port(args.host, args.port).close()  # a taken port fails here, before Ray starts
    keys = tuple(args.api_key) + ((os.environ["ROOFLINE_API_KEY"],) if os.environ.get("ROOFLINE_API_KEY") else ())
    name = args.served_model_name or served_model_name(args.model)
    serve_args = replica_serve_args(args, serve_parser()) + [
        "--served-model-name", name, "--threads", str(max(1, int(options.num_cpus)))]
    ray.init(address=address, include_dashboard=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(serve_args, keys, options), name=APP_NAME, route_prefix="/")
        scale = (f"{options.num_replicas} replicas" if options.num_replicas is not None else
                 f"{options.min_replicas}..{options.max_replicas} replicas, autoscaled")
        print(f"roofline: serving {name} on http://{args.host}:{args.port}/v1 through Ray Serve ({scale}; "
              f"Ray at {address or 'a local instance'})", flush=True)
        stop.wait()
        logger.warning("draining: in-flight requests finish (up to 30 s), then the replicas stop")
        serve.delete(APP_NAME)  # Ray waits for each replica's requests (graceful_shutdown_timeout_s)
        if address is None:
            serve.shutdown()
    finally:
        ray.shutdown()
    return 0
