"""The real server on a loopback port: the default model, an AsyncEngine, the app, uvicorn in a thread.

One server per test session keeps the suite fast (the model loads once). It requires API keys, so
every client here sends one; tests that change server state (queue limit, draining) restore it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from roofline.server.context import ServingContext

API_KEYS = ("test-key", "second-key")
KV_CACHE_MEMORY = 256 << 20


@dataclass
class LiveServer:
    """A running server: where it listens and its serving context (engine, config, metrics, drain state)."""

    base_url: str
    ctx: ServingContext
    model: str
    api_keys: tuple[str, ...] = API_KEYS

    def client(self, **kwargs) -> httpx.Client:
        """An httpx client with the API key."""
        headers = {"Authorization": f"Bearer {API_KEYS[0]}", **kwargs.pop("headers", {})}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=kwargs.pop("timeout", 60), **kwargs)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no request is active in the engine and the KV cache is empty."""
        deadline = time.monotonic() + timeout
        engine = self.ctx.engine
        while engine.num_active or engine.engine.kv.usage > 0:
            assert time.monotonic() < deadline, "the engine did not go idle"
            time.sleep(0.02)


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


@contextlib.contextmanager
def serve(llm, max_queue: int = 256, app_options: dict | None = None, **config):
    """`llm` served on 127.0.0.1:<free port> by uvicorn in a thread, until the block ends.

    `app_options`: more create_app keywords (tracer, profiling).
    """
    from roofline.engine.async_engine import AsyncEngine
    from roofline.server import ServerConfig, create_app
    from roofline.engine_args import served_model_name

    engine = AsyncEngine(llm.engine, max_queue=max_queue)
    config = ServerConfig(**{"model_name": served_model_name("default"), "api_keys": API_KEYS,
                             "max_body_bytes": 1 << 20, **config})
    app = create_app(engine, config, **(app_options or {}))
    sock = _free_socket()
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", app.state.ctx, config.model_name)
    finally:
        uv.should_exit = True
        thread.join(10)
        engine.shutdown()
        sock.close()


@pytest.fixture(scope="session")
def server():
    """The default model served on 127.0.0.1:<free port>, for the whole session."""
    from roofline import LLM

    with serve(LLM(model="default", kv_cache_memory=KV_CACHE_MEMORY)) as live:
        yield live


@pytest.fixture
def http(server):
    """An httpx client for the live server, with the API key."""
    with server.client() as c:
        yield c
    server.wait_idle()


@pytest.fixture
def oai(server):
    """The official OpenAI client pointed at the live server."""
    import openai

    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEYS[0], max_retries=0, timeout=60)
    yield client
    client.close()
    server.wait_idle()


@pytest.fixture(scope="session")
def start_server():
    """`serve` for test modules that need their own server (conftest is not imported by name)."""
    return serve
