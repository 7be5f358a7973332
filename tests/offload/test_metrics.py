"""/metrics shows the offload placement and the planner's predicted rate."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest

from roofline.offload.placement import parse_placement
from roofline.offload.plan import OffloadPlan
from roofline.server.metrics import EngineCollector

STATS = {"num_running": 0, "kv_cache_usage": 0.0, "prefix_cache_hit_rate": 0.0, "prompt_tokens": 0,
         "generated_tokens": 0, "num_preemptions": 0}


def _scrape(plan: OffloadPlan | None) -> str:
    engine = SimpleNamespace(engine=SimpleNamespace(stats=lambda: STATS, runner=SimpleNamespace(offload_plan=plan)),
                             num_waiting=0)
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine))
    return generate_latest(registry).decode()


def test_metrics_carry_the_placement_as_a_label_and_the_predicted_rate():
    plan = OffloadPlan(parse_placement("w=25/0/75", 4), 12.5, 4, 1 << 20, None, "cpu")
    text = _scrape(plan)
    assert 'roofline_offload_placement{placement="w25/0/75 kv100/0"} 1.0' in text
    assert "roofline_offload_predicted_tokens_per_second 12.5" in text


def test_without_offload_there_are_no_offload_metrics():
    assert "roofline_offload" not in _scrape(None)
