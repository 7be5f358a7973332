"""The Ray Serve backend on a local Ray (loopback): two replicas answer chat, a killed one is replaced, and an
autoscaled deployment goes to zero replicas when idle and serves the next request.

One Ray instance for the module; the applications are redeployed on it test by test, in file order.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import httpx
import psutil
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from roofline.parallel.ray_app import (APP_NAME, DEPLOYMENT_NAME, LOOPBACK_ONLY_ENV, RayServeOptions,  # noqa: E402
                                       app_builder, build_app)

KEY = "ray-test-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
REPLICA_TITLE = f"ray::ServeReplica:{APP_NAME}:{DEPLOYMENT_NAME}"  # what Ray names a replica's worker process


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url():
    """A local Ray with Serve's HTTP proxy on a free loopback port."""
    assert os.environ.get(LOOPBACK_ONLY_ENV) == "0"  # set by conftest.py before anything imports ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=80 << 20,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def deploy(model_dir: str, options: RayServeOptions) -> None:
    args = ["--model", model_dir, "--threads", "1", "--kv-cache-memory", "16MiB", "--log-level", "warning"]
    serve.run(build_app(args, (KEY,), options), name=APP_NAME, route_prefix="/")


def replica_pids() -> list[int]:
    """Process ids of the live replicas (this test's local Ray runs under this process)."""
    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            title = proc.cmdline()[0]  # "ray::ServeReplica:app:Deployment", ".method" appended while busy
            if proc.status() != psutil.STATUS_ZOMBIE and title.split(".")[0] == REPLICA_TITLE:
                pids.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):  # gone meanwhile, or no title
            pass
    return sorted(pids)


def until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def chat(url: str, stream: bool = False, **headers) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 6, "ignore_eos": True,
            "stream": stream}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers or HEADERS, timeout=120)


def test_two_replicas_answer_chat_streamed_or_not_with_the_same_api(ray_url, random_llama_dir):
    deploy(random_llama_dir, RayServeOptions(num_replicas=2, num_cpus=0.5))
    assert len(replica_pids()) == 2
    answer = chat(ray_url)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 6
    streamed = chat(ray_url, stream=True)
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) >= 7
    refused = chat(ray_url, Authorization="Bearer wrong")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    models = httpx.get(f"{ray_url}/v1/models", headers=HEADERS, timeout=30).json()
    assert models["data"][0]["id"] == random_llama_dir


def test_a_killed_replica_is_replaced_and_the_app_keeps_answering(ray_url):
    before = replica_pids()
    os.kill(before[0], signal.SIGKILL)
    until(lambda: len(replica_pids()) == 2 and before[0] not in replica_pids(), 90, "a replacement replica")
    assert set(replica_pids()) & set(before) == {before[1]}
    assert all(chat(ray_url).status_code == 200 for _ in range(3))


def test_autoscaling_from_zero_returns_to_zero_when_idle_and_serves_the_next_request(ray_url, random_llama_dir):
    # through app_builder, as KubeRay's serveConfigV2 builds it (the key from $ROOFLINE_API_KEY)
    os.environ["ROOFLINE_API_KEY"] = KEY
    try:
        serve.run(app_builder({"model": random_llama_dir, "min_replicas": 0, "max_replicas": 1, "idle_timeout_s": 3,
                               "look_back_period_s": 1,
                               "num_cpus": 0.5, "serve_args": ["--kv-cache-memory", "16MiB"]}),
                  name=APP_NAME, route_prefix="/")
    finally:
        del os.environ["ROOFLINE_API_KEY"]
    assert chat(ray_url).status_code == 200
    assert len(replica_pids()) == 1  # busy a moment ago: not scaled down yet
    until(lambda: replica_pids() == [], 90, "scale to zero")
    answer = chat(ray_url)  # waits in Ray's proxy while a replica starts, instead of failing
    assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] == "length"
    assert len(replica_pids()) == 1
