"""`roofline serve` as a process: its flags, a port in use, and SIGTERM draining in-flight requests before exit 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from roofline import cli
from roofline import engine_args
from roofline.cli import build_parser
from roofline.errors import RooflineError
from roofline.engine_args import served_model_name
from roofline.server.commands import bind_port


def test_serve_is_registered_with_engine_flags():
    args = build_parser().parse_args(["serve", "--port", "9000", "--api-key", "a", "--api-key", "b",
                                      "--max-queue", "3", "--kv-cache-memory", "64MiB"])
    assert (args.port, args.api_key, args.max_queue, args.kv_cache_memory) == (9000, ["a", "b"], 3, 64 << 20)
    assert args.host == "127.0.0.1" and args.model == "default" and callable(args.func)


@pytest.mark.parametrize("argv", [["--port", "70000"], ["--port", "x"], ["--max-queue", "0"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", *argv])
    assert exc.value.code == 2


def test_served_model_name():
    assert served_model_name("default") == "SmolLM2-135M-Instruct"
    assert served_model_name("/models/qwen.gguf") == "/models/qwen.gguf"


def test_port_in_use_exits_2_before_loading_the_model(monkeypatch, capsys):
    monkeypatch.setattr(engine_args, "make_llm", lambda args: pytest.fail("the model loaded although the port is taken"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--port", str(port)]) == 2
    out = capsys.readouterr()
    assert out.err.splitlines() == [f"roofline: error: port {port} on 127.0.0.1 is already in use; stop what holds "
                                    f"it or choose another --port"]
    assert out.out == ""


def test_bind_port():
    with bind_port("127.0.0.1", 0) as sock:
        assert sock.getsockname()[1] > 0
    with pytest.raises(RooflineError, match="cannot listen on 192.0.2.1 port 8000: .*; check --host"):
        bind_port("192.0.2.1", 8000)  # TEST-NET-1: an address no machine has


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(port: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "roofline.cli", "serve", "--port", str(port), "--kv-cache-memory", "64MiB",
           "--max-model-len", "1024", "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)


def _stream_in_thread(url: str, max_tokens: int) -> tuple[threading.Thread, threading.Event, dict]:
    started, result = threading.Event(), {"events": []}

    def run():
        body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        result["events"].append(line[6:])
                        started.set()
        except httpx.HTTPError as exc:
            result["error"] = exc
        started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, started, result


def _post_in_thread(url: str, max_tokens: int) -> tuple[threading.Thread, dict]:
    result = {}

    def run():
        body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True}
        try:
            result["response"] = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        except httpx.HTTPError as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_sigterm_drains_then_exits_0():
    """503 to newcomers at once; a short in-flight stream finishes; at the timeout a long stream ends with an
    error event and [DONE], a long non-stream request gets a 503 JSON error; no traceback; exit 0."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    drain_timeout = 8.0
    proc = _start_server(port, "--drain-timeout", str(drain_timeout))
    try:
        short, short_started, short_result = _stream_in_thread(url, max_tokens=48)
        long, long_started, long_result = _stream_in_thread(url, max_tokens=1000)
        plain, plain_result = _post_in_thread(url, max_tokens=1000)
        assert short_started.wait(60) and long_started.wait(60)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        deadline = t0 + 5
        while httpx.get(f"{url}/health", timeout=5).status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        resp = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=5)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "draining"
        short.join(60)
        assert "error" not in short_result, short_result
        assert short_result["events"][-1] == "[DONE]"
        assert '"completion_tokens":48' in short_result["events"][-2]  # the in-flight stream ran to its end
        assert proc.wait(30) == 0
        assert drain_timeout - 0.5 < time.monotonic() - t0 < drain_timeout + 10
        long.join(10)
        plain.join(10)
        assert "error" not in long_result, long_result  # the chunked body ended properly
        assert long_result["events"][-1] == "[DONE]"
        error = json.loads(long_result["events"][-2])["error"]
        assert error["code"] == "server_shutting_down" and "drain timeout" in error["message"]
        assert "error" not in plain_result, plain_result
        assert plain_result["response"].status_code == 503
        assert plain_result["response"].json()["error"]["code"] == "server_shutting_down"
        log = proc.stdout.read()
        assert "Traceback" not in log and "CancelledError" not in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
