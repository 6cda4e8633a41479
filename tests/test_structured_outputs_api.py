"""Structured outputs and their errors through the HTTP API of a real server (``python -m
server`` on the tiny pair at gamma 5, compact JSON): OpenAI's ``response_format``
(``json_object``, ``json_schema`` and the ``openai`` client's ``parse`` with a pydantic
model) and vLLM's ``structured_outputs`` extension, streamed and not, under mixed rules."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel
from server_process import running_server

MODEL = "kad-tiny"
SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no", "maybe"]},
        "confident": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["answer", "confident", "tags"],
    "additionalProperties": False,
}
RULES = [{"rule": "kad_dual", "lam": 0.4}, {"rule": "confidence_bet"}, {"rule": "kad_primal"},
         {"rule": "aligned"}, {"rule": "base"}]


class Verdict(BaseModel):
    answer: Literal["yes", "no", "maybe"]
    confident: bool


@pytest.fixture(scope="module")
def server(tiny_pair):
    with running_server(tiny_pair, "kad-structured-", gamma=5,
                        engine={"json_compact": True}) as running:
        yield running["url"]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def _messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Question {i}: is two plus two four? Answer in JSON."}]


def test_fifty_json_schema_answers_parse_and_validate_streamed_and_not(client):
    """50 ``json_schema`` requests at temperature 0.7, half streamed, each rule in turn:
    every answer parses and validates against the schema."""
    response_format = {"type": "json_schema",
                       "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
    for i in range(50):
        kwargs = {"model": MODEL, "messages": _messages(i), "max_tokens": 96,
                  "temperature": 0.7, "seed": i, "response_format": response_format,
                  "extra_body": {"kad": RULES[i % len(RULES)]}}
        if i % 2:
            text, finish = "", None
            for chunk in client.chat.completions.create(stream=True, **kwargs):
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
        else:
            choice = client.chat.completions.create(**kwargs).choices[0]
            text, finish = choice.message.content, choice.finish_reason
        assert finish == "stop", (i, text)
        jsonschema.validate(json.loads(text), SCHEMA)


def test_the_openai_clients_parse_round_trips_a_pydantic_model(client):
    completion = client.beta.chat.completions.parse(
        model=MODEL, messages=_messages(0), response_format=Verdict, max_tokens=64,
        temperature=0.7, seed=3)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Verdict)
    assert completion.usage.completion_tokens > 0


def test_json_object_and_the_structured_outputs_extension(server, client):
    text = client.chat.completions.create(
        model=MODEL, messages=_messages(1), max_tokens=96, seed=1,
        response_format={"type": "json_object"}).choices[0].message.content
    assert isinstance(json.loads(text), dict)
    for constraint, check in (
            ({"choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
            ({"regex": r"[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
            ({"grammar": 'root ::= "x" ("y" | "z")'}, lambda t: t in ("xy", "xz")),
            ({"json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None)):
        for endpoint, body in (("completions", {"prompt": "Colour:"}),
                               ("chat/completions", {"messages": _messages(2)})):
            response = httpx.post(f"{server}/v1/{endpoint}", json={
                "model": MODEL, "max_tokens": 96, "temperature": 0.9, "seed": 5,
                "structured_outputs": constraint, **body}, timeout=120)
            assert response.status_code == 200, response.text
            choice = response.json()["choices"][0]
            text = choice["text"] if "text" in choice else choice["message"]["content"]
            assert choice["finish_reason"] == "stop" and check(text), (constraint, text)


@pytest.mark.parametrize("body, param", [
    ({"structured_outputs": {"regex": "[a-z"}}, "structured_outputs"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "root ::= "}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
    ({"structured_outputs": {"guided": 1}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "structured_outputs"),
    ({"guided_regex": "a+"}, "guided_regex"),
])
def test_a_malformed_constraint_is_a_400_naming_its_field(server, body, param):
    response = httpx.post(f"{server}/v1/chat/completions", json={
        "model": MODEL, "messages": _messages(3), "max_tokens": 8, **body}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    # The server stays healthy and serves the next request.
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
