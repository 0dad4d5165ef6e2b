"""Prometheus metrics, one registry per application (tests run several apps in one process)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the handler)

# Up to 30 s: a request can take the body timeout (15 s) and more. Past the last finite bucket a
# histogram cannot tell 6 s from 60 s, and histogram_quantile() reports that bucket's bound.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# The method label takes these values only. The method is the client's to choose: aiohttp's
# pure-Python parser (AIOHTTP_NO_EXTENSIONS, or no C extension for the platform) accepts any
# token, and one new series per invented method would grow /metrics and memory without bound.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT"})


@dataclass
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    queue_depth: Gauge
    in_flight: Gauge
    pool_busy: Gauge
    rejected: Counter
    hsm_errors: Counter
    database_errors: Counter
    auth_failures: Counter
    loop_lag: Histogram

    @classmethod
    def create(cls) -> "Metrics":
        reg = CollectorRegistry()
        return cls(
            registry=reg,
            requests=Counter("gateway_http_requests", "HTTP requests by route and status",
                             ["method", "route", "status"], registry=reg),
            latency=Histogram("gateway_http_request_seconds", "HTTP request latency",
                              ["route"], buckets=LATENCY_BUCKETS, registry=reg),
            queue_depth=Gauge("gateway_admission_queue_depth", "requests waiting for a worker",
                              registry=reg),
            in_flight=Gauge("gateway_http_in_flight", "HTTP requests being handled", registry=reg),
            pool_busy=Gauge("gateway_pool_busy", "signing/verification workers busy", registry=reg),
            rejected=Counter("gateway_admission_rejected", "requests refused by admission control",
                             ["reason"], registry=reg),
            hsm_errors=Counter("gateway_hsm_errors", "HSM failures seen by the HTTP layer",
                               ["code"], registry=reg),
            database_errors=Counter("gateway_database_errors", "requests failed because the database was "
                                    "unavailable (503 database_unavailable)", registry=reg),
            auth_failures=Counter("gateway_auth_failures", "refused requests (401/403/404 by rule)",
                                  ["code"], registry=reg),
            loop_lag=Histogram("gateway_event_loop_lag_seconds",
                               "how late a timer on the event loop runs (time every callback waits)",
                               buckets=LATENCY_BUCKETS, registry=reg),
        )

    def __post_init__(self) -> None:
        self._children: dict[tuple[str, str, int], tuple] = {}

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one request and its latency (label children cached: this runs per request)."""
        if method not in METHODS:
            method = "other"
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = (self.requests.labels(method, route, str(status)), self.latency.labels(route))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def set_pool_gauges(self, busy: int, queued: int) -> None:
        self.pool_busy.set(busy)
        self.queue_depth.set(queued)

    def render(self) -> bytes:
        return generate_latest(self.registry)
