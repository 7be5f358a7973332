"""Plan search: every plan fits, SLOs hold, objectives rank as they say."""

import pytest

from roofline.planner.hardware import hardware_presets
from roofline.planner.layout import Workload
from roofline.planner.memory import memory_needed
from roofline.planner.model_presets import model_presets
from roofline.planner.search import Objective, PlanRequest, search
from roofline.planner.units import parse_slo

LLAMA_70B = model_presets()["llama-3.1-70b"]
WORKLOAD = Workload(prompt_len=3840, output_len=256)


@pytest.mark.parametrize("objective", list(Objective))
@pytest.mark.parametrize("hardware,count", [("h100", 4), ("a100-40gb", 8), ("l4", 1)])
def test_every_plan_fits_its_memory(objective, hardware, count):
    hw = hardware_presets()[hardware]
    request = PlanRequest(WORKLOAD, count=count, objective=objective, top_k=10)
    result = search(LLAMA_70B, hw, request)
    assert result.plans
    for plan in result.plans:
        memory = memory_needed(LLAMA_70B, hw, plan.layout, plan.batch, WORKLOAD.context)
        assert memory.fits and memory.total <= hw.memory_bytes
        assert plan.layout.num_devices <= count
        assert 1 <= plan.batch <= plan.max_batch


def test_slo_is_met_and_ranked_by_throughput():
    slo = parse_slo("ttft=1s,tpot=50ms")
    result = search(LLAMA_70B, hardware_presets()["h100"], PlanRequest(WORKLOAD, count=4, slo=slo))
    assert result.is_slo_met
    throughputs = [plan.prediction.throughput_tok_s for plan in result.plans]
    assert throughputs == sorted(throughputs, reverse=True)
    for plan in result.plans:
        assert plan.meets_slo and plan.prediction.ttft_s <= 1.0 and plan.prediction.tpot_s <= 0.05
        assert plan.reason.split(" at batch ")[0] in ("memory-bound", "compute-bound", "transfer-bound",
                                                       "communication-bound", "overhead-bound")


def test_latency_objective_prefers_batch_one_and_more_tensor_parallelism():
    result = search(LLAMA_70B, hardware_presets()["h100"],
                    PlanRequest(WORKLOAD, count=4, objective=Objective.LATENCY))
    best = result.plans[0]
    assert best.batch == 1 and best.layout.tp == 4


def test_cost_objective_ranks_by_price_per_token():
    result = search(LLAMA_70B, hardware_presets()["h100"],
                    PlanRequest(WORKLOAD, count=8, objective=Objective.COST, slo=parse_slo("tpot=100ms")))
    prices = [plan.prediction.usd_per_mtok for plan in result.plans]
    assert prices == sorted(prices)


def test_impossible_slo_returns_nearest_misses():
    result = search(LLAMA_70B, hardware_presets()["h100"],
                    PlanRequest(WORKLOAD, count=4, slo=parse_slo("tpot=100us")))
    assert not result.is_slo_met and result.plans
    assert not any(plan.meets_slo for plan in result.plans)


def test_too_big_model_offloads_or_reports_nothing():
    spec = model_presets()["llama-3.1-405b"]
    request = PlanRequest(Workload(1024, 128), count=1)
    offloaded = search(spec, hardware_presets()["h100"], request)
    assert offloaded.plans and all(plan.layout.placement.is_offloaded for plan in offloaded.plans)
    nothing = search(spec, hardware_presets()["t4"], PlanRequest(Workload(1024, 128), allow_offload=False))
    assert nothing.plans == [] and nothing.num_fitting == 0


def test_cpu_search_uses_disk_not_host_offload():
    result = search(model_presets()["smollm2-135m"], hardware_presets()["cpu"],
                    PlanRequest(Workload(512, 128), top_k=50))
    assert result.plans
    assert all(plan.layout.placement.weights_on_host == 0 for plan in result.plans)
