"""Raw HTTP against the server with a fake engine: SSE framing, every error status in
OpenAI's shape, the context window, engine failures, a burst of malformed requests, and a
non-streaming client that hangs up."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest
from fake_engine import MODEL, check_openai_error, post_json, serve_fake
from waiting import wait_ready, wait_until

MAX_MODEL_LEN = 256


def sse_events(body: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, checking the framing on the way."""
    assert body.endswith("\n\n")
    events = body.split("\n\n")[:-1]
    assert all(event.startswith("data: ") and "\n" not in event for event in events)
    return [event.removeprefix("data: ") for event in events]


def post_stream(url: str, path: str, body: dict) -> tuple[httpx.Response, list[str]]:
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=30) as response:
        text = response.read().decode()
    return response, sse_events(text)


# --- SSE framing ---------------------------------------------------------------------------
def test_completion_sse_framing(served):
    response, events = post_stream(served[0], "/v1/completions", {
        "model": MODEL, "prompt": "abc", "max_tokens": 4, "stream": True,
        "stream_options": {"include_usage": True},
    })
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert {p["object"] for p in payloads} == {"text_completion"}
    assert len({p["id"] for p in payloads}) == 1 and payloads[0]["id"].startswith("cmpl-")
    assert all(p["model"] == MODEL for p in payloads)
    text_chunks = [p for p in payloads if p["choices"] and p["choices"][0]["text"]]
    assert len(text_chunks) == 4  # one token per fake-engine delta
    assert all(p["choices"][0]["finish_reason"] is None for p in text_chunks)
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"
    usage = payloads[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 4
    assert usage["kad"]["rule"] == "kad_dual" and usage["kad"]["emitted_tokens"] == 4


def test_chat_sse_framing(served):
    response, events = post_stream(served[0], "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
        "stream": True, "n": 2,
    })
    assert response.status_code == 200 and events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert {p["object"] for p in payloads} == {"chat.completion.chunk"}
    assert all(len(p["choices"]) == 1 and "usage" not in p for p in payloads)
    for index in (0, 1):
        mine = [p["choices"][0] for p in payloads if p["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert all(c["finish_reason"] is None for c in mine[:-1])
        assert mine[-1]["finish_reason"] == "length" and mine[-1]["delta"] == {}
        assert len([c for c in mine if c["delta"].get("content")]) == 3


# --- errors --------------------------------------------------------------------------------
def test_error_shape_and_kad_messages(served):
    response = httpx.post(f"{served[0]}/v1/completions", json={
        "model": MODEL, "prompt": "x", "kad": {"rule": "kad_dual", "lam": 3}})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == "kad"
    assert "lam" in error["message"] and "[0" in error["message"]

    unsupported = httpx.post(f"{served[0]}/v1/completions", json={
        "model": MODEL, "prompt": "x", "best_of": 2}).json()["error"]
    assert (unsupported["param"], unsupported["code"]) == ("best_of", "unsupported_field")
    nested = httpx.post(f"{served[0]}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "robot", "content": "x"}]}).json()["error"]
    assert nested["param"] == "messages.0.role" and "'user'" in nested["message"]
    form = httpx.post(f"{served[0]}/v1/completions", content=b"model=x&prompt=y",
                      headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 400 and "JSON object" in form.json()["error"]["message"]


BAD_COMPLETIONS = [
    # (body, status, the field the message or param must name)
    (b"{not json", 400, None),
    (b"\xff\xfe\x00garbage", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": MODEL}, 400, "prompt"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL, "prompt": []}, 400, "prompt"),
    ({"model": MODEL, "prompt": [[]]}, 400, "prompt"),
    ({"model": MODEL, "prompt": 42}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "top_k": -5}, 400, "top_k"),
    ({"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "n": 1000}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "seed": -1}, 400, "seed"),
    ({"model": MODEL, "prompt": "x", "stop": [""]}, 400, "stop"),
    ({"model": MODEL, "prompt": "x", "stop": ["a"] * 20}, 400, "stop"),
    ({"model": MODEL, "prompt": "x", "stream": "yes please"}, 400, "stream"),
    # Strict types: no coercion from strings or booleans.
    ({"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": MODEL, "prompt": "x", "stream": 1}, 400, "stream"),
    ({"model": MODEL, "prompt": "x", "n": "2"}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "n": 2.0}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "16"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": "0.5"}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "temperature": True}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "ignore_eos": "true"}, 400, "ignore_eos"),
    ({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": "yes"}}, 400,
     "stream_options.include_usage"),
    ({"model": MODEL, "prompt": "x", "kad": {"rule": "kad_dual", "lam": "0.4"}}, 400,
     "kad.lam"),
    ({"model": MODEL, "prompt": [True, False]}, 400, "prompt"),
    ({"model": MODEL, "prompt": [[1, True]]}, 400, "prompt"),
    ({"model": MODEL, "prompt": [1, "a"]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "stop": 5}, 400, "stop"),
    # Lone surrogates (JSON can escape them; nothing downstream can encode them).
    (b'{"model": "kad-test", "prompt": "\\ud800"}', 400, "prompt"),
    (b'{"model": "kad-test", "prompt": ["ok", "a\\udfffb"]}', 400, "prompt"),
    (b'{"model": "kad-test", "prompt": "x", "stop": ["\\ud800"]}', 400, "stop"),
    (b'{"model": "\\ud800", "prompt": "x"}', 400, "model"),
    ({"model": MODEL, "prompt": "x", "kad": {"rule": "nope"}}, 400, "kad"),
    ({"model": MODEL, "prompt": "x", "kad": {"rule": "kad_dual", "mu": 0.3}}, 400, "kad"),
    ({"model": MODEL, "prompt": "x", "kad": {"rule": "kad_dual", "lam": 3}}, 400, "kad"),
    ({"model": MODEL, "prompt": "x", "kad": {"rule": "kad_dual", "mu": 0.1}}, 400, "kad"),
    ({"model": MODEL, "prompt": "x", "kad": {"rule": "base", "x": 1}}, 400, "kad"),
    ({"model": MODEL, "prompt": "x", "kad": "kad_dual"}, 400, "kad"),
    ({"model": MODEL, "prompt": "x", "kad": {"rule": "implicit_reward"}}, 400, "kad"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"5": 100.5}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"5": "1"}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"-5": 1}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"hello": 1}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, 400,
     "logit_bias"),
    ({"model": MODEL, "prompt": "x", "min_tokens": -1}, 400, "min_tokens"),
    ({"model": MODEL, "prompt": "x", "min_tokens": 9, "max_tokens": 8}, 400, "min_tokens"),
    ({"model": MODEL, "prompt": "x", "bad_words": [""]}, 400, "bad_words"),
    ({"model": MODEL, "prompt": "x", "bad_words": "word"}, 400, "bad_words"),
    ({"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "x", "logprobs": "3"}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "x", "logprobs": True}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "x", "echo": 1}, 400, "echo"),
    ({"model": MODEL, "prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"model": MODEL, "prompt": "x", "suffix": "end"}, 400, "suffix"),
    ({"model": MODEL, "prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"model": MODEL, "prompt": "x", "frequency_penalty": -2.01}, 400, "frequency_penalty"),
    ({"model": MODEL, "prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"model": MODEL, "prompt": "x", "repetition_penalty": "1.2"}, 400, "repetition_penalty"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "echo"),
    ({"model": MODEL, "prompt": [99999]}, 400, "prompt"),
    ({"model": "other", "prompt": "x"}, 404, "model"),
    ({"model": MODEL, "prompt": " the" * 300}, 400, "prompt"),  # prompt alone too long
]
BAD_CHATS = [
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages"),
    ({"model": MODEL, "messages": "hi"}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"a": 1}]},
     400, "tools"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "xml"}}, 400, "response_format"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_schema", "json_schema": {}}}, 400, "response_format"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": "2"}, 400, "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
     400, "stream"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}] * 9000}, 400,
     "messages"),
    (b'{"model": "kad-test", "messages": [{"role": "user", "content": "\\ud800"}]}', 400,
     "messages.0.content"),
    ((b'{"model": "kad-test", "messages": [{"role": "user", "content": '
      b'[{"type": "text", "text": "\\udc00"}]}]}'), 400, "messages.0.content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": 1},
     400, "logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     400, "top_logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True,
      "top_logprobs": 21}, 400, "top_logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
      "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
]


@pytest.mark.parametrize(("body", "status", "field"), BAD_COMPLETIONS)
def test_completion_errors(served, body, status, field):
    check_openai_error(post_json(served[0], "/v1/completions", body), status, field)


@pytest.mark.parametrize(("body", "status", "field"), BAD_CHATS)
def test_chat_errors(served, body, status, field):
    check_openai_error(post_json(served[0], "/v1/chat/completions", body), status, field)


def test_unknown_route_method_and_model_codes(served):
    url = served[0]
    missing = httpx.get(f"{url}/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    wrong_method = httpx.get(f"{url}/v1/completions")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    model = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert model.json()["error"]["code"] == "model_not_found"


def test_harmless_fields_and_nulls_are_accepted(served):
    response = httpx.post(f"{served[0]}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
        "max_tokens": 2, "user": "alice", "metadata": {"a": 1}, "store": False,
        "temperature": None, "top_p": None, "n": None, "stream": None,
        "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0,
        "parallel_tool_calls": True, "tools": [], "response_format": {"type": "text"},
        "kad": {"rule": "kad_dual", "lam": 0},  # an integer is a number
    })
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


# --- the context window --------------------------------------------------------------------
def test_context_window(served, tokenizer):
    url, engine = served
    prompt = " the" * 200  # 200 tokens of the 256-token window
    assert len(tokenizer.encode(prompt, add_special_tokens=False)) == 200
    fits = httpx.post(f"{url}/v1/completions", json={
        "model": MODEL, "prompt": prompt, "max_tokens": 56})
    assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] == 56
    over = httpx.post(f"{url}/v1/completions", json={
        "model": MODEL, "prompt": prompt, "max_tokens": 57})
    assert over.status_code == 400
    assert over.json()["error"]["code"] == "context_length_exceeded"
    assert "256" in over.json()["error"]["message"]
    # Not given: the completions default (16) and, for chat, the rest of the window.
    default = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": prompt})
    assert default.json()["usage"]["completion_tokens"] == 16
    clamped = httpx.post(f"{url}/v1/completions", json={
        "model": MODEL, "prompt": " the" * 250})
    assert clamped.json()["usage"]["completion_tokens"] == 6
    messages = [{"role": "user", "content": "hi"}]
    chat = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": messages})
    usage = chat.json()["usage"]
    assert usage["total_tokens"] == MAX_MODEL_LEN
    assert engine.seen[-1][2].max_tokens == MAX_MODEL_LEN - usage["prompt_tokens"]
    full = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": " the" * 256})
    assert full.status_code == 400 and full.json()["error"]["param"] == "prompt"


# --- engine failures -----------------------------------------------------------------------
def test_engine_failure_is_a_500_in_openai_shape(tokenizer):
    thread, engine = serve_fake(tokenizer, engine_options={"fail_after": 2})
    try:
        wait_ready(thread.url)
        plain = httpx.post(f"{thread.url}/v1/completions", json={
            "model": MODEL, "prompt": "x", "max_tokens": 8})
        assert plain.status_code == 500
        error = plain.json()["error"]
        assert error["type"] == "internal_server_error" and "crashed" in error["message"]
        response, events = post_stream(thread.url, "/v1/completions", {
            "model": MODEL, "prompt": "x", "max_tokens": 8, "stream": True})
        assert response.status_code == 200  # headers were sent before the failure
        assert events[-1] == "[DONE]"
        payloads = [json.loads(e) for e in events[:-1]]
        assert len([p for p in payloads if p.get("choices")]) == 2  # two tokens, then error
        assert payloads[-1]["error"]["type"] == "internal_server_error"
        assert engine.num_unfinished_requests() == 0
    finally:
        thread.stop()


# --- robustness ----------------------------------------------------------------------------
def test_burst_of_malformed_requests_leaves_the_server_healthy(served):
    url, engine = served
    bad = ([(b, "/v1/completions") for b, _, _ in BAD_COMPLETIONS]
           + [(b, "/v1/chat/completions") for b, _, _ in BAD_CHATS])

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            async def one(i: int) -> int:
                body, path = bad[i % len(bad)]
                if isinstance(body, bytes):
                    response = await http.post(path, content=body,
                                               headers={"content-type": "application/json"})
                else:
                    response = await http.post(path, json=body)
                return response.status_code
            return await asyncio.gather(*(one(i) for i in range(200)))

    statuses = asyncio.run(burst())
    assert len(statuses) == 200 and set(statuses) <= {400, 404}
    ok = httpx.post(f"{url}/v1/completions", json={
        "model": MODEL, "prompt": "fine", "max_tokens": 5, "seed": 2})
    assert ok.status_code == 200
    body = ok.json()
    assert body["usage"]["completion_tokens"] == 5
    assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["text"]
    assert engine.num_unfinished_requests() == 0
    assert httpx.get(f"{url}/health").status_code == 200


def test_non_streaming_client_that_hangs_up_aborts_its_request(tokenizer):
    # An engine that would take an hour per token: the request is certainly still running
    # when the client hangs up, however slow the machine (no timing in the test).
    thread, engine = serve_fake(tokenizer, {"token_delay": 3600.0},
                                max_model_len=MAX_MODEL_LEN)
    try:
        wait_ready(thread.url)
        body = json.dumps({"model": MODEL, "prompt": "slow", "max_tokens": 240}).encode()
        with socket.create_connection(("127.0.0.1", thread.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: kad\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: engine.num_unfinished_requests() == 1, 30,
                       "the request never reached the engine")
        # The connection is closed, with the request still generating.
        wait_until(lambda: engine.aborted, 30, "the request was not aborted")
        assert engine.num_unfinished_requests() == 0
        assert len(engine.aborted) == 1
        line = 'kad_http_requests_total{endpoint="/v1/completions",status="499"} 1.0'
        wait_until(lambda: line in httpx.get(f"{thread.url}/metrics").text, 10,
                   "no 499 recorded")
    finally:
        thread.stop()


@pytest.mark.parametrize(("rule", "default"), [("kad_dual", 0.4), ("confidence_bet", 0.2),
                                               ("kad_squared", 0.36), ("kad_primal", 0.9)])
def test_a_rule_sent_without_its_parameter_uses_and_reports_the_default(served, rule, default):
    url, _ = served
    response = httpx.post(f"{url}/v1/completions", json={
        "model": MODEL, "prompt": "x", "max_tokens": 2, "kad": {"rule": rule}})
    assert response.status_code == 200, response.text
    assert response.json()["kad"]["rule"] == rule
    assert response.json()["kad"]["param"] == pytest.approx(default)
