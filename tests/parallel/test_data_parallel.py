"""`roofline serve --data-parallel-size 2` end to end: a tiny random-weight model, two replica processes.

One server for the module (the replicas take seconds to start); the tests that kill a replica and
drain the server run last, in file order.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from roofline.parallel.router import RoutingPolicy, estimate_cost, preferred_replica

KEY = "dp-test-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
START_TIMEOUT_S = 90.0
STREAM_TIMEOUT_S = 60.0  # a stream still open after this counts as hung


@dataclass
class DataParallelServer:
    """The running front end: its process and URL."""

    process: subprocess.Popen
    base_url: str
    log_path: str

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=HEADERS, timeout=STREAM_TIMEOUT_S)

    def metrics(self) -> dict[str, float]:
        """Each sample line of /metrics: 'name{labels}' -> value."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def wait_healthy(self, num_replicas: int, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process.poll() is None, f"the server exited; see {self.log_path}"
            try:
                body = httpx.get(f"{self.base_url}/health", timeout=2).json()
                if body["replicas"]["healthy"] == num_replicas:
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            assert time.monotonic() < deadline, f"replicas not healthy in time; see {self.log_path}"
            time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory, random_llama_dir):
    """Two replicas (1 thread each) of a tiny random model behind the router, for the whole module."""
    model_dir = random_llama_dir
    log_path = str(tmp_path_factory.mktemp("dp-log") / "server.log")
    port = _free_port()
    argv = [sys.executable, "-m", "roofline.cli", "serve", "--model", model_dir, "--data-parallel-size", "2",
            "--threads", "1", "--port", str(port), "--kv-cache-memory", "16MiB", "--log-level", "warning",
            "--api-key", KEY, "--drain-timeout", "30"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ROOFLINE_API_KEY", None)
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = DataParallelServer(process, f"http://127.0.0.1:{port}", log_path)
    try:
        server.wait_healthy(2)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def chat_body(prompt: str, max_tokens: int = 12, stream: bool = True) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": stream,
            "ignore_eos": True}


@dataclass
class StreamResult:
    """What one client saw of one stream."""

    status: int | None = None
    replica: int | None = None
    events: list[str] = field(default_factory=list)
    exception: str | None = None

    @property
    def payloads(self) -> list[dict]:
        return [json.loads(e) for e in self.events if e != "[DONE]"]

    @property
    def error_codes(self) -> list[str]:
        return [p["error"]["code"] for p in self.payloads if "error" in p]

    @property
    def text(self) -> str:
        return "".join(c["delta"].get("content") or "" for p in self.payloads if "choices" in p for c in p["choices"])

    @property
    def finish_reasons(self) -> list[str]:
        return [c["finish_reason"] for p in self.payloads if "choices" in p for c in p["choices"] if c["finish_reason"]]


def stream_chat(server: DataParallelServer, body: dict, result: StreamResult,
                on_event: threading.Event | None = None) -> None:
    """Run one streamed chat request into `result`; set `on_event` after its second event."""
    try:
        with server.client() as client, client.stream("POST", "/v1/chat/completions", json=body) as resp:
            result.status = resp.status_code
            result.replica = int(resp.headers["x-roofline-replica"]) if "x-roofline-replica" in resp.headers else None
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    result.events.append(line[len("data: "):])
                    if on_event is not None and len(result.events) == 2:
                        on_event.set()
    except Exception as exc:  # noqa: BLE001 - recorded and asserted on by the test
        result.exception = f"{type(exc).__name__}: {exc}"


def test_concurrent_streams_go_to_their_prefix_replica_and_complete(dp_server):
    prompts = [" ".join(f"w{10 + 7 * i + j}" for j in range(5)) for i in range(8)]
    results = [StreamResult() for _ in prompts]
    threads = [threading.Thread(target=stream_chat, args=(dp_server, chat_body(p), r)) for p, r in zip(prompts, results)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(STREAM_TIMEOUT_S)
    policy = RoutingPolicy()
    for prompt, result in zip(prompts, results):
        assert result.exception is None and result.status == 200
        assert result.events[-1] == "[DONE]" and not result.error_codes
        assert result.finish_reasons == ["length"] and result.text
        # a nearly idle pool keeps every prefix on its preferred replica
        assert result.replica == preferred_replica(estimate_cost(chat_body(prompt), policy).prefix_key, (0, 1))
    assert {r.replica for r in results} == {0, 1}


def test_non_streamed_routes_pass_through(dp_server):
    with dp_server.client() as client:
        first = client.post("/v1/completions", json={"prompt": "w5 w6 w7", "max_tokens": 4, "ignore_eos": True})
        again = client.post("/v1/completions", json={"prompt": "w5 w6 w7", "max_tokens": 4, "ignore_eos": True})
        assert first.status_code == again.status_code == 200
        assert first.json()["usage"]["completion_tokens"] == 4
        assert first.headers["x-roofline-replica"] == again.headers["x-roofline-replica"]  # same prefix
        models = client.get("/v1/models").json()
        assert models["object"] == "list" and [m["object"] for m in models["data"]] == ["model"]
        ids = client.post("/tokenize", json={"prompt": "w5 w6"}).json()["tokens"]
        assert client.post("/detokenize", json={"tokens": ids}).json()["prompt"].strip() == "w5 w6"
        bad = client.post("/v1/completions", content=b"{not json")
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"  # the replica's own 400
    assert httpx.post(f"{dp_server.base_url}/v1/completions", json={"prompt": "w5"}).status_code == 401
    wrong = httpx.get(f"{dp_server.base_url}/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"


def test_metrics_cover_the_router_and_each_replica(dp_server):
    samples = dp_server.metrics()
    for replica in ("0", "1"):
        assert samples[f'roofline_router_routed_requests_total{{replica="{replica}"}}'] > 0
        assert samples[f'roofline_router_outstanding_requests{{replica="{replica}"}}'] == 0
        assert samples[f'roofline_router_outstanding_tokens{{replica="{replica}"}}'] == 0
        assert samples[f'roofline_router_replica_healthy{{replica="{replica}"}}'] == 1
        assert samples[f'roofline_router_replica_pid{{replica="{replica}"}}'] > 0
        generated = [v for k, v in samples.items()
                     if k.startswith("roofline_generation_tokens_total{") and f'replica="{replica}"' in k]
        assert generated and generated[0] > 0  # the replica's own counter, labelled by replica
    assert samples['roofline_router_requests_total{route="/v1/chat/completions",status="200"}'] >= 8


def test_a_replica_killed_during_24_streams_hangs_none_and_is_restarted(dp_server):
    before = dp_server.metrics()
    pids = {r: int(before[f'roofline_router_replica_pid{{replica="{r}"}}']) for r in (0, 1)}
    results = [StreamResult() for _ in range(24)]
    streaming = [threading.Event() for _ in results]
    threads = []
    for i, result in enumerate(results):
        body = chat_body(" ".join(f"w{20 + (5 * i + j) % 400}" for j in range(6)), max_tokens=160)
        threads.append(threading.Thread(target=stream_chat, args=(dp_server, body, result, streaming[i])))
    for thread in threads[:4]:  # four streams under way (160 tokens each: far from done) ...
        thread.start()
    assert all(event.wait(STREAM_TIMEOUT_S) for event in streaming[:4])
    victim = results[0].replica
    os.kill(pids[victim], signal.SIGKILL)  # ... when the replica serving the first one dies
    for thread in threads[4:]:  # the rest arrive while it is down: retried or sent to the survivor
        thread.start()
        time.sleep(0.02)
    for thread in threads:
        thread.join(STREAM_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a stream hung"

    complete = [r for r in results if r.finish_reasons == ["length"] and not r.error_codes]
    cut = [r for r in results if r.error_codes]
    for r in results:
        assert r.exception is None and r.status == 200  # failures before streaming were retried elsewhere
        assert r.events[-1] == "[DONE]"
        assert (r in complete) != (r in cut)  # finished, or ended with an error event: never silently short
    assert all(r.error_codes == ["replica_failed"] and r.replica == victim for r in cut)
    assert results[0] in cut  # it was mid-way: ended with an error event, never cut off silently
    assert len(complete) > len(results) // 2

    with dp_server.client() as client:  # the server answers at once on the surviving replica
        assert client.post("/v1/chat/completions", json=chat_body("w7 w8", stream=False)).status_code == 200
    dp_server.wait_healthy(2)
    after = dp_server.metrics()
    assert after[f'roofline_router_replica_restarts_total{{replica="{victim}"}}'] == 1
    assert after[f'roofline_router_replica_pid{{replica="{victim}"}}'] not in (0, pids[victim])
    assert after.get(f'roofline_router_cut_streams_total{{replica="{victim}"}}', 0) == len(cut)


def test_sigterm_drains_in_flight_streams_then_stops_every_process(dp_server):
    pids = [int(v) for k, v in dp_server.metrics().items() if k.startswith("roofline_router_replica_pid")]
    result = StreamResult()
    streaming = threading.Event()
    thread = threading.Thread(target=stream_chat, args=(dp_server, chat_body("w9 w10", max_tokens=200), result,
                                                        streaming))
    thread.start()
    assert streaming.wait(STREAM_TIMEOUT_S)
    dp_server.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while httpx.get(f"{dp_server.base_url}/health").status_code != 503:  # draining: refuses new work
        assert time.monotonic() < deadline
        time.sleep(0.02)
    refused = httpx.post(f"{dp_server.base_url}/v1/completions", headers=HEADERS, json={"prompt": "w5"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    thread.join(STREAM_TIMEOUT_S)
    assert result.finish_reasons == ["length"] and result.events[-1] == "[DONE]" and not result.error_codes
    assert dp_server.process.wait(30) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
