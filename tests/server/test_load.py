"""Concurrency, cancellation and metrics on the live server."""

from __future__ import annotations

import asyncio
import re
import time

import httpx

CHAT = [{"role": "user", "content": "Count to ten."}]


def _metric(text: str, name: str, **labels) -> float | None:
    """The value of one sample in Prometheus text, or None."""
    label_re = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}{{{label_re}}} (\S+)$" if labels else rf"^{name} (\S+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else None


def test_fifty_concurrent_streams_all_complete(server, oai):
    import openai

    max_tokens = 8

    async def one(client, i: int) -> tuple[int, int, str | None]:
        stream = await client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": f"Say a number: {i}"}], max_tokens=max_tokens,
            stream=True, logprobs=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        num_entries, usage, finish = 0, None, None
        async for chunk in stream:
            for c in chunk.choices:
                num_entries += len(c.logprobs.content) if c.logprobs and c.logprobs.content else 0
                finish = c.finish_reason or finish
            usage = chunk.usage or usage
        return num_entries, usage.completion_tokens, finish

    async def run_all():
        async with openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_keys[0], max_retries=0,
                                      timeout=120, http_client=None) as client:
            return await asyncio.gather(*(one(client, i) for i in range(50)))

    results = asyncio.run(run_all())
    assert results == [(max_tokens, max_tokens, "length")] * 50


def _start_stream(server, body: dict) -> tuple[httpx.Client, httpx.Response]:
    client = server.client()
    resp = client.send(client.build_request("POST", "/v1/completions", json=body), stream=True)
    assert resp.status_code == 200
    return client, resp


def test_streaming_disconnect_frees_the_kv_cache(server, http):
    engine = server.ctx.engine
    client, resp = _start_stream(server, {"prompt": "Once upon a time", "max_tokens": 2000, "stream": True,
                                          "ignore_eos": True})
    lines = resp.iter_lines()
    first = next(line for line in lines if line.startswith("data: "))
    assert '"text"' in first
    assert engine.engine.kv.usage > 0
    generated_before = engine.engine.num_generated_tokens
    resp.close()
    client.close()
    server.wait_idle(timeout=5)
    metrics = http.get("/metrics").text
    assert _metric(metrics, "roofline_kv_cache_usage_ratio") == 0.0
    assert _metric(metrics, "roofline_num_requests_running") == 0.0
    # far fewer than 2000 tokens were generated: the request stopped when the client left
    assert engine.engine.num_generated_tokens - generated_before < 500


def test_non_streaming_disconnect_aborts(server, http):
    engine = server.ctx.engine
    start = time.monotonic()
    with server.client(timeout=httpx.Timeout(60, read=0.5)) as c:
        try:
            c.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True})
            raise AssertionError("the request should not have finished")
        except httpx.ReadTimeout:
            pass
    server.wait_idle(timeout=5)
    assert time.monotonic() - start < 5.5  # generating 3000 tokens would take far longer
    assert engine.engine.kv.usage == 0
    metrics = http.get("/metrics").text
    assert _metric(metrics, "roofline_requests_total", route="/v1/completions", status="499") >= 1


def test_metrics_cover_requests_latencies_and_engine_state(server, oai, http):
    oai.completions.create(model=server.model, prompt="Hi", max_tokens=3, extra_body={"ignore_eos": True})
    list(oai.chat.completions.create(model=server.model, messages=CHAT, max_tokens=3, stream=True))
    http.post("/v1/completions", json={"prompt": "hi", "model": "nope"})
    resp = http.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    assert _metric(text, "roofline_requests_total", route="/v1/completions", status="200") >= 1
    assert _metric(text, "roofline_requests_total", route="/v1/chat/completions", status="200") >= 1
    assert _metric(text, "roofline_requests_total", route="/v1/completions", status="404") >= 1
    for name in ("roofline_time_to_first_token_seconds", "roofline_inter_token_latency_seconds",
                 "roofline_e2e_request_latency_seconds"):
        assert _metric(text, f"{name}_count") >= 2, name
    for name in ("roofline_num_requests_running", "roofline_num_requests_waiting", "roofline_kv_cache_usage_ratio",
                 "roofline_prefix_cache_hit_rate", "roofline_batch_size_count",
                 "roofline_request_queue_time_seconds_count", "roofline_num_preemptions_total"):
        assert _metric(text, name) is not None, name
    assert _metric(text, "roofline_prompt_tokens_total") > 0
    assert _metric(text, "roofline_generation_tokens_total") >= 6
    assert _metric(text, "roofline_batch_size_count") >= 0
    # unknown paths share one label, so random URLs cannot blow up the series count
    http.get("/v1/random-path-123")
    assert _metric(http.get("/metrics").text, "roofline_requests_total", route="other", status="404") >= 1
