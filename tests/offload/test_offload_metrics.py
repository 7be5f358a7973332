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


def test_a_served_offloaded_model_reports_its_placement_and_answers(reference, tmp_path_factory, start_server):
    import dataclasses

    from roofline import LLM

    spec = reference.specs["llama-mha-bias-linear-rope"]
    spec = dataclasses.replace(spec, config={**spec.config, "num_hidden_layers": 4})
    path = str(tmp_path_factory.mktemp("offload-serve"))
    reference.save_tiny_model(spec, path, seed=9)
    body = {"model": "x", "prompt": "w5 w6 w7", "max_tokens": 5, "temperature": 0}
    resident = LLM(path, max_model_len=64, max_num_seqs=8).generate("w5 w6 w7", _greedy(5))[0].outputs[0].text
    with start_server(LLM(path, max_model_len=64, max_num_seqs=8, memory_limit="1MB")) as live, \
            live.client() as http:
        body["model"] = live.model
        answer = http.post("/v1/completions", json=body).json()
        metrics = http.get("/metrics").text
    assert answer["choices"][0]["text"] == resident
    assert 'roofline_offload_placement{placement="w25/0/75 kv100/0"} 1.0' in metrics
    assert "roofline_offload_predicted_tokens_per_second" in metrics


def _greedy(n: int):
    from roofline import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0)
