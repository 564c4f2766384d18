"""Prometheus metrics, served as text on ``GET /metrics``.

Each daemon owns its own `CollectorRegistry` (not the process-global one), so
tests and benchmarks can run several daemons' worth of metrics in one process
without name clashes. Values computed from live state (jobs by state, event
subscribers) are collected on scrape instead of being updated on every change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import prometheus_client
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

# "_created" timestamps double the series count and no dashboard of ours uses them.
prometheus_client.disable_created_metrics()

# Latency buckets from 100 us (ping over a unix socket) to a minute (LVM on a slow SAN).
_LATENCY_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Callback(Collector):
    """A collector that asks a function for its samples at scrape time."""

    def __init__(self, fn: Callable[[], Iterable[Metric]]) -> None:
        self._fn = fn

    def collect(self) -> Iterable[Metric]:
        return self._fn()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls = Counter(
            "vdsmlite_rpc_calls", "JSON-RPC calls by verb and outcome",
            ["verb", "outcome"], registry=r)
        self.latency = Histogram(
            "vdsmlite_rpc_call_duration_seconds", "JSON-RPC call latency by verb",
            ["verb"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge(
            "vdsmlite_rpc_calls_in_flight", "JSON-RPC calls executing now", registry=r)
        self.requests_rejected = Counter(
            "vdsmlite_rpc_requests_rejected", "Requests refused before dispatch",
            ["reason"], registry=r)
        self.events_published = Counter(
            "vdsmlite_events_published", "Events published on the bus", registry=r)
        self.gc_pauses = Histogram(
            "vdsmlite_gc_pause_seconds",
            "Cyclic garbage collections by generation (the daemon waits through each)",
            ["generation"], buckets=_LATENCY_BUCKETS, registry=r)

    def calls_in_flight(self) -> int:
        """JSON-RPC calls executing now (Host.getStats reports it), from the gauge the
        dispatcher keeps, so the number has one source."""
        for metric in self.in_flight.collect():
            for sample in metric.samples:
                return int(sample.value)
        return 0

    def add_gauges(self, name: str, doc: str, label: str,
                   fn: Callable[[], Mapping[str, float]]) -> None:
        """A gauge family whose samples come from `fn()` at scrape time."""

        def collect() -> Iterable[Metric]:
            family = GaugeMetricFamily(name, doc, labels=[label])
            for value_label, value in sorted(fn().items()):
                family.add_metric([value_label], value)
            yield family

        self.registry.register(_Callback(collect))

    def add_gauge(self, name: str, doc: str, fn: Callable[[], float]) -> None:
        def collect() -> Iterable[Metric]:
            yield GaugeMetricFamily(name, doc, value=fn())

        self.registry.register(_Callback(collect))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def handle(self, request: web.Request) -> web.Response:
        # Content-Type goes in headers: aiohttp refuses a charset inside
        # content_type=, and Prometheus 3 rejects application/octet-stream.
        return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
