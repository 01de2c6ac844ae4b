"""``GET /metrics`` of the webhook and the upload server (Prometheus text format).

Counters per service: requests by route and status (unknown paths count as route ``other``, so
a scanner cannot grow the label set), rejected credentials, rate-limited requests, bytes
received; a gauge of the spool's queue depth, read at scrape time. Only loopback clients that
did not come through the TLS front (no ``X-Forwarded-For``), or a caller with the service's
token/secret, may read them (:func:`smt_droplet.httpserver.metrics_response`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

AUTH_REJECTED = frozenset({"unauthorized", "bad_ticket"})
RATE_LIMITED = frozenset({"rate_limited", "client_rate_limited"})


class ServerMetrics:
    """The metrics of one server process (its own registry: nothing global)."""

    def __init__(self, service: str, queue_depth: Callable[[], int]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.service = service
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "smt_http_requests",
            "Requests by route and HTTP status.",
            ["service", "route", "status"],
            registry=self.registry,
        )
        self.auth_rejected = Counter(
            "smt_http_auth_rejected",
            "Requests refused for a missing or wrong token, secret, signature or ticket.",
            ["service"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "smt_http_rate_limited",
            "Requests refused by a rate limit (429).",
            ["service"],
            registry=self.registry,
        )
        self.received = Counter(
            "smt_http_received_bytes",
            "Request body bytes received.",
            ["service"],
            registry=self.registry,
        )
        depth = Gauge(
            "smt_http_queue_depth",
            "Ingest requests waiting in the spool.",
            ["service"],
            registry=self.registry,
        )
        depth.labels(service=service).set_function(queue_depth)
        for counter in (self.auth_rejected, self.rate_limited, self.received):
            counter.labels(service=service)  # present (0) from the start

    def observe(self, route: str, status: int | str, outcome: str, bytes_in: int) -> None:
        self.requests.labels(service=self.service, route=route, status=str(status)).inc()
        if outcome in AUTH_REJECTED:
            self.auth_rejected.labels(service=self.service).inc()
        if outcome in RATE_LIMITED:
            self.rate_limited.labels(service=self.service).inc()
        if bytes_in:
            self.received.labels(service=self.service).inc(bytes_in)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def new_metrics(service: str, queue_depth: Callable[[], int]) -> Any:
    """A :class:`ServerMetrics`, or ``None`` without ``prometheus_client`` (no ``/metrics``)."""
    try:
        return ServerMetrics(service, queue_depth)
    except ImportError:
        return None
