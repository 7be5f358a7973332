"""POST /debug/profile (serve --enable-profiling): a readable torch profiler trace of the next N engine steps."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from starlette.testclient import TestClient

from roofline.engine.profiler import MAX_PROFILE_STEPS
from roofline.server.profiling import ProfilingConfig


@pytest.fixture(scope="module")
def profiled(start_server, tmp_path_factory):
    """A live server of the default model with profiling on, traces written to a fresh folder."""
    from roofline import LLM

    folder = str(tmp_path_factory.mktemp("profiles"))
    with start_server(LLM(model="default", kv_cache_memory=64 << 20),
                      app_options={"profiling": ProfilingConfig(folder)}) as live:
        yield live


def _wait_for_hook(live, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not live.ctx.engine._step_hooks:
        assert time.monotonic() < deadline, "the profiler never reached the engine"
        time.sleep(0.01)


def test_profile_records_the_next_steps_as_chrome_trace(profiled):
    answer: dict = {}

    def ask() -> None:
        with profiled.client() as http:
            answer["response"] = http.post("/debug/profile", params={"steps": 3, "timeout": 60})

    asker = threading.Thread(target=ask)
    asker.start()
    _wait_for_hook(profiled)
    with profiled.client() as http:  # the steps to record: 8 decode steps, more than the 3 asked for
        r = http.post("/v1/completions", json={"prompt": "Count: 1, 2,", "max_tokens": 8, "temperature": 0,
                                               "ignore_eos": True})
        assert r.status_code == 200
    asker.join(60)
    response = answer["response"]
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["num_steps"] == body["steps_requested"] == 3 and body["complete"] is True
    with open(body["path"]) as f:
        trace = json.load(f)
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"roofline.step#0", "roofline.step#1", "roofline.step#2"} <= names
    assert "roofline.step#3" not in names
    assert any(n and n.startswith("aten::") for n in names)  # the model's own ops are in it
    assert not profiled.ctx.engine._step_hooks  # the hook is gone once done


def test_an_idle_engine_is_a_408_that_says_so(profiled):
    with profiled.client() as http:
        r = http.post("/debug/profile", params={"steps": 2, "timeout": 0.3})
    assert r.status_code == 408
    assert "idle" in r.json()["error"]["message"]


@pytest.mark.parametrize("steps", ["0", "-1", str(MAX_PROFILE_STEPS + 1), "99999999999999999999", "abc", "1.5",
                                   ""])
def test_bad_steps_are_a_400(profiled, steps):
    with profiled.client() as http:
        r = http.post("/debug/profile", params={"steps": steps})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "steps" and "steps must" in error["message"] and "\n" not in error["message"]


@pytest.mark.parametrize("timeout", ["0", "-2", "nan", "inf", "soon"])
def test_bad_timeouts_are_a_400(profiled, timeout):
    with profiled.client() as http:
        r = http.post("/debug/profile", params={"steps": 1, "timeout": timeout})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "timeout"


def test_the_route_needs_the_api_key(profiled):
    r = httpx.post(f"{profiled.base_url}/debug/profile", params={"steps": 1})
    assert r.status_code == 401


def test_without_the_flag_there_is_no_route(profiled):
    from roofline.server import create_app

    app = create_app(profiled.ctx.engine, profiled.ctx.config)  # the same engine, profiling off
    with TestClient(app) as client:
        r = client.post("/debug/profile", params={"steps": 1},
                        headers={"Authorization": f"Bearer {profiled.api_keys[0]}"})
        assert r.status_code == 404
        assert client.post("/debug/profile", params={"steps": 1}).status_code == 401  # still keyed, like /v1


@pytest.mark.parametrize("argv, message", [
    (["--profile-dir", "somewhere"], "--profile-dir needs --enable-profiling"),
    (["--enable-profiling", "--data-parallel-size", "2"], "work on one engine"),
    (["--otlp-traces-endpoint", "http://127.0.0.1:4318", "--data-parallel-size", "2"], "work on one engine"),
])
def test_bad_flag_combinations_are_one_line_and_exit_2(argv, message, capsys):
    from roofline.cli import main

    assert main(["serve", "--port", "0", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
