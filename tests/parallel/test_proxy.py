"""ReplicaProxy's stream relay on its own: whole events through, a cut stream ended by an error, never silently."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest

from roofline.parallel.metrics import RouterMetrics, merge_replica_metrics
from roofline.parallel.proxy import ReplicaProxy
from roofline.parallel.replicas import ReplicaState, ReplicaSupervisor
from roofline.parallel.router import Router
from roofline.server.errors import APIError


def make_proxy() -> ReplicaProxy:
    router = Router(1)
    supervisor = ReplicaSupervisor(1, lambda port: ["true"], dict(os.environ), router)
    supervisor.replicas[0].state = ReplicaState.HEALTHY
    router.set_routable(0, True)
    return ReplicaProxy(router, supervisor, RouterMetrics(router, supervisor, "internal"), "internal")


async def chunks_of(parts: list[bytes], then: Exception | None = None):
    for part in parts:
        yield part
    if then is not None:
        raise then


async def relay(parts: list[bytes], then: Exception | None = None) -> tuple[list[bytes], APIError | None]:
    proxy = make_proxy()
    chunks = chunks_of(parts[1:], then)
    out, error = [], None
    try:
        async for events in proxy._relay(0, chunks, parts[0], asyncio.Event()):
            out.append(events)
    except APIError as exc:
        error = exc
    await proxy.client.aclose()
    await proxy.supervisor.aclose()
    return out, error


def test_a_whole_stream_passes_through_unchanged():
    parts = [b'data: {"a": 1}\n\n', b'data: {"b"', b': 2}\n\ndata: [DONE]\n\n']
    out, error = asyncio.run(relay(parts))
    assert error is None
    assert b"".join(out) == b"".join(parts)
    assert out[1] == b'data: {"b": 2}\n\ndata: [DONE]\n\n'  # an event split over reads goes out whole


def test_a_stream_cut_mid_event_ends_with_an_error_after_the_last_whole_event():
    parts = [b'data: {"a": 1}\n\n', b'data: {"b": 2}\n\ndata: {"c"']
    out, error = asyncio.run(relay(parts, then=httpx.RemoteProtocolError("peer closed connection")))
    assert b"".join(out) == b'data: {"a": 1}\n\ndata: {"b": 2}\n\n'  # the half event is dropped
    assert error is not None and error.status == 503 and error.code == "replica_failed"


@pytest.mark.parametrize("parts", [[b'data: {"a": 1}\n\n'], [b'data: {"a": 1}\n\n', b"data: [DO"]])
def test_a_stream_that_ends_cleanly_without_done_is_still_an_error(parts):
    _, error = asyncio.run(relay(parts))
    assert error is not None and error.code == "replica_failed"


def test_a_cancelled_request_ends_with_the_shutdown_error():
    async def scenario() -> APIError:
        proxy = make_proxy()
        cancel = asyncio.Event()
        proxy._cancels.add(cancel)

        async def forever():
            yield b'data: {"a": 1}\n\n'
            await asyncio.sleep(60)
            yield b""

        chunks = forever()
        relayed = proxy._relay(0, chunks, await anext(chunks), cancel)
        assert await anext(relayed) == b'data: {"a": 1}\n\n'
        assert proxy.cancel_all("draining: deadline passed") == 1
        with pytest.raises(APIError) as info:
            await anext(relayed)
        await proxy.client.aclose()
        await proxy.supervisor.aclose()
        return info.value

    error = asyncio.run(scenario())
    assert error.code == "server_shutting_down" and error.message == "draining: deadline passed"


def test_replica_metrics_merge_into_one_family_each_with_a_replica_label():
    text = ("# HELP roofline_generation_tokens_total Tokens generated.\n"
            "# TYPE roofline_generation_tokens_total counter\n"
            "roofline_generation_tokens_total {n}\n")
    merged = merge_replica_metrics([(0, text.format(n=5)), (1, None), (2, text.format(n=7))]).decode()
    assert merged.count("# TYPE roofline_generation_tokens_total counter") == 1
    assert 'roofline_generation_tokens_total{replica="0"} 5.0' in merged
    assert 'roofline_generation_tokens_total{replica="2"} 7.0' in merged
    assert 'replica="1"' not in merged
