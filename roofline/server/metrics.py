"""Prometheus metrics, all prefixed `roofline_`, in a registry of their own per app.

Request-level latencies are observed by the server as outputs stream; engine state (running and
waiting requests, KV-cache usage, prefix-cache hit rate, token totals) is read at scrape time.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from roofline.engine.async_engine import AsyncEngine
from roofline.sampling_params import SLO

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TOKEN_GAP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_SAMPLE_INTERVAL_S = 0.1


class EngineCollector:
    """Reads the engine's gauges and counters when Prometheus scrapes."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self):
        """Yield the engine metric families."""
        stats = self.engine.engine.stats()
        yield GaugeMetricFamily("roofline_num_requests_running", "Sequences in the running batch.",
                                value=stats["num_running"])
        yield GaugeMetricFamily("roofline_num_requests_waiting", "Requests queued and not yet running.",
                                value=self.engine.num_waiting)
        yield GaugeMetricFamily("roofline_kv_cache_usage_ratio", "Share of KV-cache blocks in use (0 to 1).",
                                value=stats["kv_cache_usage"])
        yield GaugeMetricFamily("roofline_prefix_cache_hit_rate",
                                "Share of looked-up prompt tokens found in the prefix cache since start.",
                                value=stats["prefix_cache_hit_rate"])
        yield CounterMetricFamily("roofline_prompt_tokens", "Prompt tokens admitted.", value=stats["prompt_tokens"])
        yield CounterMetricFamily("roofline_generation_tokens", "Tokens generated.",
                                  value=stats["generated_tokens"])
        yield CounterMetricFamily("roofline_num_preemptions", "Requests preempted for lack of KV blocks.",
                                  value=stats["num_preemptions"])
        plan = getattr(self.engine.engine.runner, "offload_plan", None)  # set when a memory limit or offload is given
        if plan is not None:
            placement = GaugeMetricFamily("roofline_offload_placement",
                                          "The offload placement running (label: percent of layer weights on "
                                          "device/host/disk, KV device/host); always 1.", labels=["placement"])
            placement.add_metric([plan.placement.describe()], 1)
            yield placement
            yield GaugeMetricFamily("roofline_offload_predicted_tokens_per_second",
                                    "The planner's predicted output tokens/s for that placement.",
                                    value=plan.predicted_tok_s)


class ServerMetrics:
    """The server's metrics; `render()` gives the Prometheus text format."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("roofline_requests", "HTTP requests by route and status code.",
                                ["route", "status"], registry=r)
        self.time_to_first_token = Histogram(
            "roofline_time_to_first_token_seconds", "From submission to the engine to the first generated token.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "roofline_inter_token_latency_seconds", "Between consecutive tokens of a sequence.",
            buckets=_TOKEN_GAP_BUCKETS, registry=r)
        self.e2e_latency = Histogram("roofline_e2e_request_latency_seconds",
                                     "From submission to the engine to the last token, for requests that finished.",
                                     buckets=_E2E_BUCKETS, registry=r)
        self.queue_time = Histogram("roofline_request_queue_time_seconds",
                                    "From arrival until the engine first scheduled the request.",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "roofline_batch_size",
            f"Sequences in the running batch, sampled every {BATCH_SAMPLE_INTERVAL_S} s while any run.",
            buckets=_BATCH_BUCKETS, registry=r)
        self.slo_ttft = Histogram("roofline_slo_time_to_first_token_seconds",
                                  "Time to first token by latency class (slo_class, or custom/none).",
                                  ["slo_class"], buckets=_LATENCY_BUCKETS, registry=r)
        self.slo_tpot = Histogram("roofline_slo_time_per_output_token_seconds",
                                  "Mean time per output token after the first, by latency class.",
                                  ["slo_class"], buckets=_TOKEN_GAP_BUCKETS, registry=r)
        self.slo_requests = Counter("roofline_slo_requests",
                                    "Finished requests by latency class and outcome: attained, missed (a target "
                                    "was not met), rejected (unattainable even on an idle engine), no_target.",
                                    ["slo_class", "outcome"], registry=r)
        r.register(EngineCollector(engine))

    def observe_slo(self, class_name: str, slo: SLO | None, start: float, first: float | None, end: float,
                    num_tokens: int) -> None:
        """Record a finished request's TTFT and TPOT under its class, and whether it met its targets."""
        ttft = None if first is None else first - start
        tpot = (end - first) / (num_tokens - 1) if first is not None and num_tokens > 1 else None
        if ttft is not None:
            self.slo_ttft.labels(class_name).observe(ttft)
        if tpot is not None:
            self.slo_tpot.labels(class_name).observe(tpot)
        if slo is None:
            outcome = "no_target"
        else:
            missed = (slo.ttft_ms is not None and (ttft is None or ttft * 1e3 > slo.ttft_ms)) or \
                (slo.tpot_ms is not None and tpot is not None and tpot * 1e3 > slo.tpot_ms)
            outcome = "missed" if missed else "attained"
        self.slo_requests.labels(class_name, outcome).inc()

    def render(self) -> bytes:
        """The metrics in Prometheus' text exposition format."""
        return generate_latest(self.registry)

    async def sample_batch_size(self, interval_s: float = BATCH_SAMPLE_INTERVAL_S) -> None:
        """Forever: observe the running batch size while the engine is busy."""
        while True:
            await asyncio.sleep(interval_s)
            running = self.engine.num_running
            if running:
                self.batch_size.observe(running)
