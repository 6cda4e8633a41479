"""/metrics merges the engine's own registry (vLLM's vllm:* metrics) with the kad_* ones."""

from __future__ import annotations

import httpx
from fake_engine import load_tokenizer, serve_fake
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from waiting import wait_ready

from server.engine.interface import RequestStats
from server.metrics import ServerMetrics


def engine_registry() -> tuple[CollectorRegistry, Gauge, Counter]:
    """A registry shaped like vLLM's (names and labels of PrometheusStatLogger)."""
    registry = CollectorRegistry()
    usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage", ["model_name", "engine"],
                  registry=registry)
    drafts = Counter("vllm:spec_decode_num_draft_tokens", "Draft tokens",
                     ["model_name", "engine"], registry=registry)
    return registry, usage, drafts


def test_server_metrics_collect_the_engine_registry_at_scrape_time():
    registry, usage, drafts = engine_registry()
    metrics = ServerMetrics(lambda: {"kad_dual": RequestStats(drafted=4, accepted=3)},
                            lambda: 2, registry)
    usage.labels("kad", "0").set(0.25)
    drafts.labels("kad", "0").inc(7)
    text = generate_latest(metrics.registry).decode()
    assert 'vllm:kv_cache_usage_perc{engine="0",model_name="kad"} 0.25' in text
    assert 'vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="kad"} 7.0' in text
    assert 'kad_drafted_tokens_total{rule="kad_dual"} 4.0' in text
    assert "kad_requests_running 2.0" in text
    assert text.count("# TYPE vllm:kv_cache_usage_perc gauge") == 1
    usage.labels("kad", "0").set(0.5)  # read live, not copied at registration
    assert 'model_name="kad"} 0.5' in generate_latest(metrics.registry).decode()


def test_server_metrics_without_an_engine_registry_have_only_kad_metrics():
    text = generate_latest(ServerMetrics(dict, lambda: 0).registry).decode()
    assert "kad_requests_running 0.0" in text and "vllm:" not in text


def test_get_metrics_serves_the_engine_metrics_beside_the_kad_ones(tiny_pair):
    registry, usage, _ = engine_registry()
    usage.labels("kad-test", "0").set(0.125)
    thread, _ = serve_fake(load_tokenizer(str(tiny_pair.draft)),
                           {"metrics_registry": registry})
    try:
        wait_ready(thread.url)
        response = httpx.get(f"{thread.url}/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert 'vllm:kv_cache_usage_perc{engine="0",model_name="kad-test"} 0.125' \
            in response.text
        assert "kad_requests_running 0.0" in response.text
    finally:
        thread.stop()
