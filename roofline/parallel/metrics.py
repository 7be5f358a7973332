"""The router's Prometheus metrics (`roofline_router_*`) and the replicas' own, relabelled by replica.

A scrape of the front end's /metrics returns the router's families, then every family the replicas
export (`roofline_requests`, `roofline_time_to_first_token_seconds`, ...) once, with a `replica` label
on each sample. A replica that does not answer in time is left out of that scrape.
"""

from __future__ import annotations

import asyncio

import httpx
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from roofline.parallel.replicas import ReplicaState, ReplicaSupervisor
from roofline.parallel.router import Router

REPLICA_LABEL = "replica"
SCRAPE_TIMEOUT_S = 2.0


class RouterCollector:
    """Per-replica load, health and restarts, read from the router and supervisor at scrape time."""

    def __init__(self, router: Router, supervisor: ReplicaSupervisor) -> None:
        self.router = router
        self.supervisor = supervisor

    def collect(self):
        """Yield the per-replica gauge and counter families."""
        labels = [REPLICA_LABEL]
        requests = GaugeMetricFamily("roofline_router_outstanding_requests",
                                     "Requests the router has in flight on each replica.", labels=labels)
        tokens = GaugeMetricFamily("roofline_router_outstanding_tokens",
                                   "Estimated prompt + maximum new tokens of the requests in flight on each replica.",
                                   labels=labels)
        healthy = GaugeMetricFamily("roofline_router_replica_healthy",
                                    "1 while the replica passes /health and takes work, else 0.", labels=labels)
        pids = GaugeMetricFamily("roofline_router_replica_pid", "The replica's process id (0 while none runs).",
                                 labels=labels)
        restarts = CounterMetricFamily("roofline_router_replica_restarts",
                                       "Times the replica's process was started again after it died.", labels=labels)
        for replica, load in zip(self.supervisor.replicas, self.router.loads):
            name = str(replica.index)
            requests.add_metric([name], load.num_requests)
            tokens.add_metric([name], load.num_tokens)
            healthy.add_metric([name], 1 if replica.state is ReplicaState.HEALTHY else 0)
            pids.add_metric([name], replica.pid or 0)
            restarts.add_metric([name], replica.num_restarts)
        yield from (requests, tokens, healthy, pids, restarts)


class RouterMetrics:
    """The front end's registry: request counts by route, routing outcomes, and the replicas' metrics."""

    def __init__(self, router: Router, supervisor: ReplicaSupervisor, internal_api_key: str) -> None:
        self.supervisor = supervisor
        self.registry = CollectorRegistry()
        r = self.registry
        # `requests` is the attribute GuardMiddleware counts every answered request on
        self.requests = Counter("roofline_router_requests", "HTTP requests to the front end by route and status.",
                                ["route", "status"], registry=r)
        self.routed = Counter("roofline_router_routed_requests", "Requests sent to each replica (retries included).",
                              [REPLICA_LABEL], registry=r)
        self.retries = Counter("roofline_router_retries",
                               "Requests moved to another replica because this one failed before answering.",
                               [REPLICA_LABEL], registry=r)
        self.cut_streams = Counter("roofline_router_cut_streams",
                                   "Streams this replica stopped mid-way, ended with an error event.",
                                   [REPLICA_LABEL], registry=r)
        r.register(RouterCollector(router, supervisor))
        self._headers = {"Authorization": f"Bearer {internal_api_key}"}

    async def _scrape(self, client: httpx.AsyncClient, index: int, url: str) -> tuple[int, str | None]:
        try:
            resp = await client.get(f"{url}/metrics", headers=self._headers, timeout=SCRAPE_TIMEOUT_S)
        except httpx.HTTPError:
            return index, None
        return index, resp.text if resp.status_code == 200 else None

    async def render(self, client: httpx.AsyncClient) -> bytes:
        """The router's metrics, then every replica's, merged family by family with a replica label."""
        targets = [(r.index, r.url) for r in self.supervisor.replicas if r.state is ReplicaState.HEALTHY]
        scraped = await asyncio.wait_for(asyncio.gather(*(self._scrape(client, i, url) for i, url in targets)),
                                         SCRAPE_TIMEOUT_S + 1)
        return generate_latest(self.registry) + merge_replica_metrics(scraped)


def merge_replica_metrics(scraped: list[tuple[int, str | None]]) -> bytes:
    """Prometheus text of every family in the replicas' expositions, each sample labelled with its replica."""
    families: dict[str, Metric] = {}
    for index, text in scraped:
        if text is None:
            continue
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                merged.add_sample(sample.name, {**sample.labels, REPLICA_LABEL: str(index)}, sample.value,
                                  sample.timestamp)
    registry = CollectorRegistry()

    class _Merged:
        def collect(self):
            return list(families.values())

    registry.register(_Merged())
    return generate_latest(registry)
