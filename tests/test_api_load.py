"""Concurrency against a fake engine: 32 simultaneous streams whose tokens add up in
/metrics, and clients that hang up mid-stream leaving nothing running in the engine."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fake_engine import MODEL, load_tokenizer, serve_fake
from waiting import wait_ready, wait_until


@pytest.fixture(scope="module")
def served(tiny_pair):
    thread, engine = serve_fake(load_tokenizer(str(tiny_pair.draft)),
                                engine_options={"token_delay": 0.005})
    wait_ready(thread.url)
    yield thread.url, engine
    thread.stop()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not (line.startswith((name + "{", name + " "))):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _stream(http: httpx.AsyncClient, i: int) -> tuple[str, int, str]:
    text, usage, reason = "", -1, ""
    async with http.stream("POST", "/v1/completions", json={
        "model": MODEL, "prompt": f"prompt {i}", "max_tokens": 5 + i % 7, "stream": True,
        "seed": i, "stream_options": {"include_usage": True},
        "kad": {"rule": "nudging", "lam": 0.3} if i % 2 else None,
    }) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            payload = json.loads(line[6:])
            assert "error" not in payload, payload
            if payload.get("usage"):
                usage = payload["usage"]["completion_tokens"]
            for choice in payload["choices"]:
                text += choice["text"]
                reason = choice["finish_reason"] or reason
    return text, usage, reason


def test_32_concurrent_streams_and_metrics_add_up(served):
    url, engine = served
    before = httpx.get(f"{url}/metrics").text

    async def run_all():
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            return await asyncio.gather(*(_stream(http, i) for i in range(32)))

    results = asyncio.run(run_all())
    expected = [5 + i % 7 for i in range(32)]
    assert [usage for _, usage, _ in results] == expected
    assert all(reason == "length" and text for text, _, reason in results)
    tokenizer = engine.tokenizer
    assert [len(tokenizer.encode(text, add_special_tokens=False)) for text, _, _ in results] \
        == expected
    after = httpx.get(f"{url}/metrics").text

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    by_rule = {"nudging": sum(expected[1::2]), "kad_dual": sum(expected[0::2])}
    assert delta("kad_generation_tokens_total") == sum(expected)
    for rule, tokens in by_rule.items():
        assert delta("kad_generation_tokens_total", rule=rule) == tokens
        assert delta("kad_emitted_tokens_total", rule=rule) == tokens
        assert delta("kad_accepted_tokens_total", rule=rule) == tokens  # fake: all accepted
        assert delta("kad_drafted_tokens_total", rule=rule) == 2 * tokens
        assert delta("kad_deferred_mass_total", rule=rule) == pytest.approx(0.5 * tokens)
    assert metric(after, "kad_acceptance_rate", rule="nudging") == pytest.approx(0.5)
    assert metric(after, "kad_mean_deferred_mass", rule="nudging") == pytest.approx(0.5)
    assert delta("kad_http_requests_total", endpoint="/v1/completions", status="200") == 32
    assert delta("kad_request_duration_seconds_count", endpoint="/v1/completions") == 32
    assert delta("kad_time_to_first_token_seconds_count", endpoint="/v1/completions") == 32
    assert metric(after, "kad_requests_running") == 0
    assert engine.num_unfinished_requests() == 0


def test_clients_hanging_up_mid_stream_free_the_engine(served):
    url, engine = served
    aborted_before = len(engine.aborted)
    seen = []

    async def hang_up_after_first_token(http: httpx.AsyncClient) -> None:
        async with http.stream("POST", "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 200, "stream": True, "n": 1,
        }) as response:
            async for line in response.aiter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    seen.append(engine.num_unfinished_requests())
                    break  # leaves the stream: the connection is closed

    async def run_all():
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            await asyncio.gather(*(hang_up_after_first_token(http) for _ in range(10)))

    asyncio.run(run_all())
    assert max(seen) > 0  # they really were running when the clients left
    # Each request's generator is closed (aborted) and records the abort as it unwinds.
    wait_until(lambda: not engine.num_unfinished_requests()
               and len(engine.aborted) - aborted_before >= 10, 10)
    assert engine.num_unfinished_requests() == 0
    assert len(engine.aborted) - aborted_before == 10
    wait_until(lambda: not metric(httpx.get(f"{url}/metrics").text, "kad_requests_running"),
               10)
    assert metric(httpx.get(f"{url}/metrics").text, "kad_requests_running") == 0
