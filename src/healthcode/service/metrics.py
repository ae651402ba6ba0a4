"""Prometheus metrics, served on their own HTTP port."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

REGISTRY = CollectorRegistry()
REQUESTS = Counter(
    "healthcode_requests", "RPCs handled, by method and status code", ["method", "code"], registry=REGISTRY
)
LATENCY = Histogram(
    "healthcode_request_seconds",
    "RPC latency by method",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
ROWS = Counter(
    "healthcode_rows_evaluated",
    "Persons evaluated, by method (PutRiskList, PutPolicy, Reevaluate: the persons they re-evaluated)",
    ["method"],
    registry=REGISTRY,
)
ROWS_INGESTED = Counter(
    "healthcode_rows_ingested", "Rows sent to the ingest RPCs, by method", ["method"], registry=REGISTRY
)
CHANGES_STREAMED = Counter(
    "healthcode_changes_streamed", "Status changes sent to change-stream subscribers, by method", ["method"],
    registry=REGISTRY,
)  # fmt: skip
RISK_VERSION = Gauge("healthcode_risk_list_version", "Version of the risk list in force", registry=REGISTRY)
POLICY_VERSION = Gauge("healthcode_policy_version", "Version of the policy timeline in force", registry=REGISTRY)


class FrontCollector:
    """Calls the shedding front forwarded and refused (counters it keeps in memory shared with the server)."""

    def __init__(self, front: Any) -> None:
        self.front = front

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "healthcode_front_calls",
            "Calls the shedding front forwarded, or refused with RESOURCE_EXHAUSTED",
            labels=["outcome"],
        )
        family.add_metric(["forwarded"], self.front.forwarded)
        family.add_metric(["refused"], self.front.refused)
        yield family


def serve_metrics(listen: str, **tls: Any) -> Any:
    """Start the metrics HTTP server on ``host:port`` (port 0 picks a free one; ``tls``: prometheus_client's
    ``certfile``, ``keyfile``, ... for HTTPS) in a thread of its own; returns the server (``server_port``; stop it
    with ``shutdown()`` and ``server_close()``)."""
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=REGISTRY, **tls)
    return server
