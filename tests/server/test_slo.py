"""Latency classes, per-request targets and tenants through the server (one tiny-model server for the module)."""

from __future__ import annotations

import pytest

from roofline import LLM
from roofline.engine.fair_share import DEFAULT_TENANT
from roofline.engine.step_model import StepTimeModel
from roofline.errors import ConfigError
from roofline.sampling_params import SLO
from roofline.server.protocol import CompletionRequest
from roofline.server.slo import (SLOClass, TenantSpec, key_tenant, parse_duration_ms, parse_slo_class, parse_tenant,
                                 resolve_job, tenant_weights)

CLASSES = {"interactive": SLOClass("interactive", SLO(1000, 100), 0), "bulk": SLOClass("bulk", None, 5)}
KEY_TENANTS = {"test-key": TenantSpec(2.0, "interactive"), "second-key": TenantSpec(1.0, "bulk")}


def test_durations_classes_and_tenants_parse():
    assert parse_duration_ms("1s") == 1000 and parse_duration_ms("100ms") == 100 and parse_duration_ms("250") == 250
    assert parse_slo_class("interactive=ttft:1s,tpot:100ms") == SLOClass("interactive", SLO(1000, 100), 0)
    assert parse_slo_class("bulk=priority:3") == SLOClass("bulk", None, 3)
    assert parse_tenant("alice=weight:2,class:interactive") == ("alice", TenantSpec(2.0, "interactive"))
    for bad, message in [("x=ttft:soon", "not a positive duration"), ("x=ttft:-1s", "not a positive duration"),
                         ("x=latency:1s", "unknown key 'latency'"), ("=ttft:1s", "NAME=key:value"),
                         ("x=priority:high", "priority must be an integer")]:
        with pytest.raises(ConfigError, match=message):
            parse_slo_class(bad)
    for bad, message in [("a=weight:0", "weight must be a number > 0"), ("a=weight:many", "weight must be"),
                         ("a=share:1", "unknown key 'share'")]:
        with pytest.raises(ConfigError, match=message):
            parse_tenant(bad)


def test_tenants_are_key_digests_or_users():
    assert tenant_weights({"k1": TenantSpec(3.0)}, has_keys=True) == {key_tenant("k1"): 3.0}
    assert tenant_weights({"alice": TenantSpec(3.0)}, has_keys=False) == {"user:alice": 3.0}
    assert "k1" not in key_tenant("k1")


def job(body: dict, tenants=None, has_keys=False, authorization=None):
    req = CompletionRequest.model_validate({"prompt": "x", **body})
    return resolve_job(req, CLASSES, tenants or {}, has_keys, authorization)


def test_a_request_takes_its_class_and_its_own_targets_win():
    j = job({"slo_class": "interactive"})
    assert (j.priority, j.slo, j.class_name, j.tenant) == (0, SLO(1000, 100), "interactive", DEFAULT_TENANT)
    j = job({"slo_class": "interactive", "slo": {"tpot_ms": 50}, "priority": 2})
    assert (j.priority, j.slo) == (2, SLO(1000, 50))
    j = job({"slo": {"ttft_ms": 300}})
    assert (j.slo, j.class_name) == (SLO(ttft_ms=300), "custom")
    assert job({}).class_name == "none" and job({}).slo is None
    j = job({}, {"test-key": TenantSpec(1.0, "bulk")}, has_keys=True, authorization=b"Bearer test-key")
    assert (j.priority, j.class_name, j.tenant) == (5, "bulk", key_tenant("test-key"))
    assert job({"user": "bob"}).tenant == "user:bob"


@pytest.fixture(scope="module")
def slo_server(tiny_model_dirs, start_server):
    llm = LLM(tiny_model_dirs["llama-5heads-mqa-tied"], kv_cache_memory=64 << 20, max_num_seqs=8,
              tenant_weights=tenant_weights(KEY_TENANTS, has_keys=True))
    with start_server(llm, model_name="tiny", slo_classes=CLASSES, tenants=KEY_TENANTS) as live:
        yield live


def test_requests_are_served_and_counted_by_class(slo_server):
    with slo_server.client() as c:
        r = c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 4, "slo": {"ttft_ms": 60000}})
        assert r.status_code == 200, r.text
        r = c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 4, "slo_class": "bulk"})
        assert r.status_code == 200, r.text
        metrics = c.get("/metrics").text
    assert 'roofline_slo_requests_total{outcome="attained",slo_class="interactive"}' in metrics  # the key's class
    assert 'roofline_slo_requests_total{outcome="no_target",slo_class="bulk"}' in metrics
    assert 'roofline_slo_time_to_first_token_seconds_count{slo_class="interactive"}' in metrics
    shares = slo_server.ctx.engine.engine.scheduler.shares
    assert shares.tokens[key_tenant("test-key")] > 0 and shares.weights[key_tenant("test-key")] == 2.0
    slo_server.wait_idle()


@pytest.mark.parametrize("body, message", [
    ({"slo_class": "gold"}, "unknown slo_class 'gold' (known: bulk, interactive)"),
    ({"slo": {"ttft_ms": -5}}, "slo.ttft_ms"),
    ({"slo": {"ttft_ms": "fast"}}, "slo.ttft_ms"),
])
def test_bad_targets_are_a_400(slo_server, body, message):
    with slo_server.client() as c:
        r = c.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2, **body})
    assert r.status_code == 400
    assert message in r.json()["error"]["message"]
    assert "\n" not in r.json()["error"]["message"]


def test_a_target_no_idle_engine_meets_is_a_429(slo_server):
    scheduler = slo_server.ctx.engine.engine.scheduler
    fitted = scheduler.step_model
    scheduler.step_model = StepTimeModel(coefficients=(0.0, 0.0, 0.5, 0.0))  # half a second per token
    try:
        with slo_server.client() as c:
            r = c.post("/v1/completions", json={"prompt": [5, 6, 7, 8], "max_tokens": 2, "slo": {"ttft_ms": 500}})
            metrics = c.get("/metrics").text
    finally:
        scheduler.step_model = fitted
    assert r.status_code == 429
    assert r.headers["Retry-After"]
    err = r.json()["error"]
    assert err["code"] == "slo_unattainable"
    assert err["message"] == ("the TTFT target of 500 ms cannot be met even on an idle engine: a 4-token prompt "
                              "takes about 2000 ms to prefill here")
    assert 'roofline_slo_requests_total{outcome="rejected",slo_class="interactive"}' in metrics
    slo_server.wait_idle()
