"""Prometheus metrics: HTTP traffic, tokens, and the alignment statistics by rule.

Each app owns its registry (tests run several apps in one process). Alignment totals are
read from the engine at scrape time, so they always agree with the engine's own counts.
The engine's own registry (vLLM's ``vllm:*`` metrics: KV-cache usage, running and waiting
requests, preemptions, speculative decoding) is collected through the app's, so one
scrape of ``/metrics`` returns both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.engine.interface import RequestStats


class _AlignmentCollector(Collector):
    def __init__(self, totals: Callable[[], dict[str, RequestStats]]) -> None:
        self._totals = totals

    def collect(self):
        totals = self._totals()
        counters = {
            "kad_drafted_tokens": ("Draft tokens proposed by the aligned model", "drafted"),
            "kad_accepted_tokens": ("Draft tokens accepted by verification", "accepted"),
            "kad_emitted_tokens": ("Tokens emitted by verification", "emitted"),
            "kad_verified_positions": ("Positions where pi was sampled", "positions"),
            "kad_deferred_positions": ("Positions where some mass was deferred", "deferred_positions"),
            "kad_deferred_mass": ("Sum over positions of the deferred mass alpha", "alpha_sum"),
            "kad_inexact_tokens": ("Tokens sampled from p because q* was missing", "inexact"),
            "kad_degraded_tokens": ("Positions whose p or q* was NaN/inf (verified against p)",
                                    "degraded"),
        }
        for name, (doc, attr) in counters.items():
            family = CounterMetricFamily(name, doc, labels=["rule"])
            for rule, stats in totals.items():
                family.add_metric([rule], float(getattr(stats, attr)))
            yield family
        rate = GaugeMetricFamily("kad_acceptance_rate", "accepted / drafted", labels=["rule"])
        alpha = GaugeMetricFamily("kad_mean_deferred_mass", "mean alpha per position",
                                  labels=["rule"])
        for rule, stats in totals.items():
            rate.add_metric([rule], stats.acceptance_rate)
            alpha.add_metric([rule], stats.mean_alpha)
        yield rate
        yield alpha


class _RegistryCollector(Collector):
    """Every metric of another registry, collected at scrape time."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self):
        yield from self._registry.collect()


class ServerMetrics:
    """The metrics of one server instance, with the engine's registry (if any) merged in."""

    def __init__(self, totals: Callable[[], dict[str, RequestStats]],
                 running: Callable[[], int],
                 engine_registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("kad_http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram(
            "kad_request_duration_seconds", "Time from request to last byte", ["endpoint"],
            registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.first_token = Histogram(
            "kad_time_to_first_token_seconds", "Time from request to first token", ["endpoint"],
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.prompt_tokens = Counter("kad_prompt_tokens", "Prompt tokens processed",
                                     registry=self.registry)
        self.generation_tokens = Counter("kad_generation_tokens", "Tokens generated",
                                         ["rule"], registry=self.registry)
        running_gauge = Gauge("kad_requests_running", "Requests in the engine",
                              registry=self.registry)
        running_gauge.set_function(lambda: float(running()))
        self.registry.register(_AlignmentCollector(totals))
        if engine_registry is not None:
            self.registry.register(_RegistryCollector(engine_registry))


class MetricsMiddleware:
    """Counts HTTP requests by endpoint and status and times them to the last byte sent.

    Pure ASGI (not ``BaseHTTPMiddleware``): streaming responses are timed to their end, and
    the disconnect message still reaches the handlers that listen for it.
    """

    def __init__(self, app, metrics: ServerMetrics, routes: Collection[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception before the response started

        async def record_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in self.routes else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
