"""The HTTP API against a fake engine: the openai client, SSE framing, every error status,
malformed-request bursts, concurrency, disconnects, auth and health."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from server.app import create_app
from server.config import ServeConfig
from fake_engine import FakeEngine
from serving import ServerThread

MODEL = "kad-test"


def make_config(**server) -> ServeConfig:
    return ServeConfig.model_validate({
        "models": {"target": "unused", "draft": "unused", "served_model_name": MODEL},
        "engine": {"max_model_len": 256},
        "server": {"max_waiting_requests": 64, **server},
    })


@pytest.fixture(scope="module")
def tokenizer(tiny_pair):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_pair.draft)


def start(tokenizer, start_delay: float = 0.0, **server) -> tuple[ServerThread, FakeEngine]:
    engines: list[FakeEngine] = []

    def factory(config):
        engines.append(FakeEngine(config, tokenizer, start_delay=start_delay))
        return engines[0]

    thread = ServerThread(create_app(make_config(**server), engine_factory=factory))
    return thread, engines[0]


@pytest.fixture(scope="module")
def served(tokenizer):
    thread, engine = start(tokenizer)
    deadline = time.time() + 10
    while httpx.get(f"{thread.url}/health").status_code != 200:
        assert time.time() < deadline
        time.sleep(0.02)
    yield thread, engine
    thread.stop()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"{served[0].url}/v1", api_key="unused", max_retries=0)


# --- the official client -------------------------------------------------------------------
def test_chat_completion_with_openai_client(client, served, tokenizer):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=12,
        seed=3, extra_body={"kad": {"rule": "nudging", "lam": 0.3}},
    )
    choice = response.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert response.usage.completion_tokens == 12
    expected_prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, tokenize=False
    )
    assert response.usage.prompt_tokens == len(tokenizer.encode(expected_prompt))
    kad = response.model_extra["kad"]
    assert kad["rule"] == "nudging" and kad["param"] == 0.3
    assert kad["emitted_tokens"] == 12 and kad["accepted_tokens"] <= kad["drafted_tokens"]
    request_id, prompt, sampling, alignment = served[1].seen[-1]
    assert alignment.rule == "nudging" and sampling.seed == 3
    assert prompt == tokenizer.encode(expected_prompt, add_special_tokens=False)


def test_completion_n_seed_and_default_rule(client):
    first = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, n=2, seed=5)
    again = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, n=2, seed=5)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert first.choices[0].text != first.choices[1].text  # seed + choice index
    assert first.usage.completion_tokens == 16
    assert first.model_extra["kad"]["rule"] == "kad_dual"  # the config default


def test_stop_sequences(client):
    free = client.completions.create(model=MODEL, prompt="Hi", max_tokens=20, seed=9)
    stop = next(free.choices[0].text[i] for i in range(3, len(free.choices[0].text))
                if free.choices[0].text[i] not in free.choices[0].text[:i])
    cut = client.completions.create(model=MODEL, prompt="Hi", max_tokens=20, seed=9, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == free.choices[0].text[: free.choices[0].text.index(stop)]


def test_streaming_with_openai_client(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10, seed=1,
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10, seed=1,
    )
    assert text == plain.choices[0].message.content


# --- raw HTTP: SSE framing and errors ------------------------------------------------------
def test_sse_framing(served):
    url = served[0].url
    with httpx.stream("POST", f"{url}/v1/completions", json={
        "model": MODEL, "prompt": "abc", "max_tokens": 4, "stream": True,
        "stream_options": {"include_usage": True},
    }) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read().decode()
    events = body.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[-1]["usage"]["completion_tokens"] == 4 and "kad" in payloads[-1]
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"
    assert {p["object"] for p in payloads} == {"text_completion"}


BAD_REQUESTS = [
    (b"{not json", 400, None),
    (b"\xff\xfe\x00garbage", 400, None),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "kad": {"rule": "nope"}}, 400, "kad"),
    ({"model": MODEL, "prompt": "x", "kad": {"rule": "kad_dual"}}, 400, "kad"),
    ({"model": MODEL, "prompt": "x", "kad": {"rule": "kad_dual", "lam": 3}}, 400, "kad"),
    ({"model": MODEL, "prompt": "x", "kad": {"rule": "implicit_reward"}}, 400, "kad"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"5": 10}}, 400, None),
    ({"model": MODEL, "prompt": [99999]}, 400, "prompt"),
    ({"model": "other", "prompt": "x"}, 404, "model"),
    ({"model": MODEL, "prompt": "x" * 2000}, 400, "prompt"),
]
BAD_CHAT = [
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ({"model": MODEL, "messages": "hi"}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"a": 1}]},
     400, None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_object"}}, 400, None),
]


def _post(url: str, path: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(f"{url}{path}", content=body,
                          headers={"content-type": "application/json"})
    return httpx.post(f"{url}{path}", json=body)


@pytest.mark.parametrize(("body", "status", "param"), BAD_REQUESTS)
def test_completion_errors(served, body, status, param):
    response = _post(served[0].url, "/v1/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "pydantic" not in response.text and "loc" not in error
    if param:
        assert param in (error["param"] or "") + error["message"]


@pytest.mark.parametrize(("body", "status", "param"), BAD_CHAT)
def test_chat_errors(served, body, status, param):
    response = _post(served[0].url, "/v1/chat/completions", body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_and_method(served):
    assert httpx.get(f"{served[0].url}/v2/nothing").json()["error"]["type"] == "not_found_error"
    assert httpx.get(f"{served[0].url}/v1/completions").status_code == 405


def test_burst_of_malformed_requests_leaves_the_server_healthy(served, client):
    bodies = [b for b, _, _ in BAD_REQUESTS] + [b for b, _, _ in BAD_CHAT]

    async def burst():
        async with httpx.AsyncClient(base_url=served[0].url, timeout=30) as http:
            async def one(i):
                body = bodies[i % len(bodies)]
                path = "/v1/chat/completions" if "messages" in str(body) else "/v1/completions"
                if isinstance(body, bytes):
                    return await http.post(path, content=body,
                                           headers={"content-type": "application/json"})
                return await http.post(path, json=body)
            return await asyncio.gather(*(one(i) for i in range(200)))

    statuses = [r.status_code for r in asyncio.run(burst())]
    assert all(s in (400, 404) for s in statuses)
    ok = client.completions.create(model=MODEL, prompt="fine", max_tokens=5, seed=2)
    assert ok.usage.completion_tokens == 5 and ok.choices[0].finish_reason == "length"
    assert served[1].num_unfinished_requests() == 0


def test_concurrent_streams_and_metrics_add_up(served):
    url = served[0].url

    def metric(text: str, name: str) -> float:
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    before = httpx.get(f"{url}/metrics").text

    async def streams():
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            async def one(i):
                count = 0
                async with http.stream("POST", "/v1/completions", json={
                    "model": MODEL, "prompt": f"p{i}", "max_tokens": 5 + i % 7, "stream": True,
                    "stream_options": {"include_usage": True},
                }) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            payload = json.loads(line[6:])
                            assert "error" not in payload
                            if payload.get("usage"):
                                count = payload["usage"]["completion_tokens"]
                return count
            return await asyncio.gather(*(one(i) for i in range(32)))

    counts = asyncio.run(streams())
    assert counts == [5 + i % 7 for i in range(32)]
    after = httpx.get(f"{url}/metrics").text
    generated = metric(after, "kad_generation_tokens_total") - metric(before, "kad_generation_tokens_total")
    emitted = metric(after, "kad_emitted_tokens_total") - metric(before, "kad_emitted_tokens_total")
    assert generated == sum(counts) == emitted
    assert "kad_acceptance_rate" in after and "kad_http_requests_total" in after


def test_disconnecting_clients_free_their_requests(served):
    thread, engine = served
    aborted_before = len(engine.aborted)

    async def leave_early():
        async with httpx.AsyncClient(base_url=thread.url, timeout=30) as http:
            async def one(i):
                async with http.stream("POST", "/v1/completions", json={
                    "model": MODEL, "prompt": "x", "max_tokens": 200, "stream": True,
                }) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            break  # hang up after the first token
            await asyncio.gather(*(one(i) for i in range(10)))

    asyncio.run(leave_early())
    deadline = time.time() + 10
    while engine.num_unfinished_requests() and time.time() < deadline:
        time.sleep(0.05)
    assert engine.num_unfinished_requests() == 0
    assert len(engine.aborted) - aborted_before == 10


# --- auth, health, admission ---------------------------------------------------------------
def test_api_key_health_and_queue_bound(tokenizer):
    thread, engine = start(tokenizer, start_delay=1.0, api_key="sekret", max_waiting_requests=2)
    try:
        url = thread.url
        assert httpx.get(f"{url}/health").status_code == 503  # still loading
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
        auth = {"Authorization": "Bearer sekret"}
        assert httpx.post(f"{url}/v1/completions", json=body, headers=auth).status_code == 503
        deadline = time.time() + 10
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.05)
        assert httpx.get(f"{url}/metrics").status_code == 200  # open without a key
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
        wrong = httpx.post(f"{url}/v1/completions", json=body,
                           headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(f"{url}/v1/completions", json=body, headers=auth).status_code == 200
        assert httpx.get(f"{url}/v1/models", headers=auth).json()["data"][0]["id"] == MODEL
        busy = httpx.post(f"{url}/v1/completions", json={**body, "n": 3}, headers=auth)
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "queue_full"
    finally:
        thread.stop()
