"""Tool calls through the HTTP API of a real server (``python -m server`` on the tiny pair,
compact JSON, a chat template that renders tools hermes-style, the hermes parser): the
grammar under pi forces valid calls from a random model for ``required`` and a named
function, streamed and not, in OpenAI's shape, with the ``openai`` client."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from server_process import running_server

MODEL = "kad-tiny"
TEMPLATE = Path(__file__).parent / "data" / "tool_chat_template.jinja"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Oslo", "Rome"]}, "days": {"enum": [1, 2, 3]}},
        "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_pair):
    with running_server(tiny_pair, "kad-tools-", gamma=3,
                        max_model_len=2048,  # the tiny vocabulary spells JSON out
                        engine={"json_compact": True},
                        models={"chat_template": str(TEMPLATE)},
                        server={"tool_call_parser": "hermes"}) as running:
        yield running["url"]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def _valid(calls) -> None:
    for call in calls:
        assert call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({call.id for call in calls}) == len(calls)


def _streamed(client, **kwargs) -> tuple[str, dict[int, dict], str | None]:
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"ids": [], "name": None, "arguments": ""})
            if call.id:
                entry["ids"].append(call.id)
            if call.function and call.function.name:
                entry["name"] = call.function.name
            entry["arguments"] += (call.function.arguments or "") if call.function else ""
        finish = chunk.choices[0].finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("parallel", [False, True])
def test_required_forces_valid_calls_streamed_and_not(client, parallel):
    """``required``: a JSON array of calls under pi (one at most without parallel calls);
    the streamed deltas carry the same calls as the whole answer of the same seed."""
    kwargs = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS,
              "tool_choice": "required", "parallel_tool_calls": parallel,
              "max_tokens": 160, "temperature": 0.8, "seed": 3}
    choice = client.chat.completions.create(**kwargs).choices[0]
    calls = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    assert calls and (len(calls) == 1 or parallel)
    _valid(calls)
    content, streamed, finish = _streamed(client, **kwargs)
    assert (content, finish) == ("", "tool_calls")
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in calls]
    assert all(len(c["ids"]) == 1 for c in streamed.values())
    assert len({c["ids"][0] for c in streamed.values()}) == len(streamed)


def test_a_named_function_is_called_with_valid_arguments_streamed_and_not(client):
    """A named function: its arguments forced by its schema, the name the named one,
    finish_reason "stop" (OpenAI's and vLLM's for a named call); the streamed arguments
    concatenate to the whole answer's."""
    kwargs = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 96,
              "tool_choice": {"type": "function", "function": {"name": "get_time"}},
              "temperature": 0.8, "seed": 5, "n": 2}
    response = client.chat.completions.create(**kwargs)
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        assert choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.function.name == "get_time"
        _valid([call])
    ids = [c.message.tool_calls[0].id for c in response.choices]
    assert len(set(ids)) == 2
    content, streamed, finish = _streamed(client, **{**kwargs, "n": 1})
    assert (content, finish) == ("", "stop")
    assert list(streamed) == [0] and streamed[0]["name"] == "get_time"
    assert streamed[0]["arguments"] == response.choices[0].message.tool_calls[0] \
        .function.arguments


def test_auto_with_the_parser_and_none_return_text(client):
    """The tiny model writes no <tool_call>: auto (hermes) and none answer with content."""
    for choice in ("auto", "none"):
        answer = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=choice, max_tokens=8,
            temperature=0).choices[0]
        assert isinstance(answer.message.content, str) and answer.message.content
        assert not answer.message.tool_calls
        assert answer.finish_reason in ("stop", "length")
        content, calls, finish = _streamed(client, model=MODEL, messages=MESSAGES,
                                           tools=TOOLS, tool_choice=choice, max_tokens=8,
                                           temperature=0)
        assert (content, calls, finish) == (answer.message.content, {}, answer.finish_reason)


def test_tools_and_tool_turns_are_in_the_prompt(server, client):
    """The prompt grows by the rendered tools and the tool turns; /tokenize counts the
    same prompt the chat endpoint sends."""
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    usage = {}
    for name, extra in (("plain", {}), ("tools", {"tools": TOOLS, "tool_choice": "none"})):
        usage[name] = client.chat.completions.create(
            model=MODEL, messages=history, max_tokens=1, **extra).usage.prompt_tokens
        counted = httpx.post(f"{server}/tokenize", json={
            "model": MODEL, "messages": history, **({"tools": TOOLS} if extra else {})})
        assert counted.json()["count"] == usage[name]
    assert usage["tools"] > usage["plain"] + 40


@pytest.mark.parametrize("extra, field", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"functions": [WEATHER["function"]]}, "functions"),
    ({"tool_choice": "required", "parallel_tool_calls": "no"}, "parallel_tool_calls"),
])
def test_malformed_tool_requests_are_400s_naming_the_field(server, extra, field):
    body = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, **extra}
    body = {k: v for k, v in body.items() if v is not None}
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == field, error
