"""Every numeric request field is bounded where the engine is, and error messages quote a
client's value cut short.

A value the engine would fail on (``top_k`` 2**64 cannot travel to vLLM's engine core) or
compute garbage with (``repetition_penalty`` 1e-38 overflows float32: every token
"degraded") is a 400 naming the field, never a 500 or a degraded token. The property tests
send extreme numbers (huge integers, subnormal floats, negative zero, ``NaN`` and
``Infinity``, which Python's JSON parser accepts) in every numeric field of both endpoints,
from a fixed list plus seeded random draws: to the app on the fake engine (fast; the
sampling options it receives must be ones vLLM accepts), and to the app on the real tiny
vLLM engine (slow; no token of a 200 may be degraded).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re

import httpx
import pytest
from fake_engine import MODEL, check_openai_error, post_json

from kad_kernels.rules import RULE_SPECS
from server.errors import ECHO_LIMIT, MESSAGE_LIMIT
from server.protocol import INT64_MAX, MIN_REPETITION_PENALTY

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
# The tiny pair's tokenizer: what the fake-engine app and the tiny engine serve.
TINY_VOCAB = 512
MAX_TOKENS = 4  # every generated request: the real engine's part stays quick


def base_body(path: str, model: str) -> dict:
    if path == COMPLETIONS:
        return {"model": model, "prompt": "The answer is", "max_tokens": MAX_TOKENS}
    return {"model": model, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": MAX_TOKENS}


def raw_body(body: dict, field: str, raw: str) -> bytes:
    """``body`` with ``field`` (``kad.lam``: inside ``kad``) set to the JSON number text
    ``raw``, written as it is (``NaN``, ``1e308``, a 31-digit integer)."""
    marker = "__kad_raw_value__"
    body = json.loads(json.dumps(body))
    *outer, leaf = field.split(".")
    target = body
    for key in outer:
        target = target[key]
    target[leaf] = marker
    return json.dumps(body).replace(f'"{marker}"', raw).encode()


# --- top_k against the vocabulary and int64 ------------------------------------------------
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@pytest.mark.parametrize("raw", [str(2**64), str(2**63), str(TINY_VOCAB + 1),
                                 "1000000000000000000000000000000", str(2**63 - 1)])
def test_top_k_above_the_vocabulary_is_a_400(served, path, raw):
    response = post_json(served[0], path, raw_body(base_body(path, MODEL), "top_k", raw))
    check_openai_error(response, 400, "top_k")
    assert response.json()["error"]["param"] == "top_k"


def test_top_k_above_the_vocabulary_streaming_is_a_400_not_an_in_band_error(served):
    body = {**base_body(COMPLETIONS, MODEL), "stream": True}
    response = post_json(served[0], COMPLETIONS, raw_body(body, "top_k", str(2**64)))
    check_openai_error(response, 400, "top_k")
    response = post_json(served[0], COMPLETIONS, raw_body(body, "top_k", str(TINY_VOCAB + 1)))
    check_openai_error(response, 400, "top_k")


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@pytest.mark.parametrize("top_k", [TINY_VOCAB, TINY_VOCAB - 1, 1, 0, -1])
def test_top_k_up_to_the_vocabulary_is_served(served, path, top_k):
    url, engine = served
    response = post_json(url, path, {**base_body(path, MODEL), "top_k": top_k})
    assert response.status_code == 200, response.text
    sampling = engine.seen[-1][2]
    assert sampling.top_k == (top_k if top_k > 0 else None)


# --- repetition_penalty's lower bound ------------------------------------------------------
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@pytest.mark.parametrize("penalty", [1e-38, 5e-324, 1e-30, MIN_REPETITION_PENALTY * 0.99,
                                     -0.0, 0])
def test_repetition_penalty_below_the_bound_is_a_400(served, path, penalty):
    response = post_json(served[0], path, {**base_body(path, MODEL),
                                           "repetition_penalty": penalty})
    check_openai_error(response, 400, "repetition_penalty")
    assert response.json()["error"]["param"] == "repetition_penalty"


@pytest.mark.parametrize("penalty", [MIN_REPETITION_PENALTY, 0.5, 1, 2])
def test_repetition_penalty_at_or_above_the_bound_is_served(served, penalty):
    url, engine = served
    response = post_json(url, COMPLETIONS, {**base_body(COMPLETIONS, MODEL),
                                            "repetition_penalty": penalty})
    assert response.status_code == 200, response.text
    assert engine.seen[-1][2].repetition_penalty == penalty


def test_max_completion_tokens_over_the_context_names_itself(served):
    response = post_json(served[0], CHAT, {**base_body(CHAT, MODEL),
                                           "max_completion_tokens": 2**63 - 1})
    check_openai_error(response, 400, "max_completion_tokens")
    assert response.json()["error"]["param"] == "max_completion_tokens"


# --- echoed values are cut short -----------------------------------------------------------
HUGE = "x" * 100_000


def test_a_100_kb_unknown_rule_is_quoted_short(served):
    for path in (COMPLETIONS, CHAT):
        response = post_json(served[0], path, {**base_body(path, MODEL),
                                               "kad": {"rule": HUGE}})
        check_openai_error(response, 400, "kad")
        message = response.json()["error"]["message"]
        # The quoted name (ECHO_LIMIT characters) and the list of known rules.
        assert len(message) < 400, len(message)
        assert "unknown rule 'xxxx" in message and "kad_dual" in message
        assert max(map(len, re.findall("x+", message))) <= ECHO_LIMIT
        assert len(response.content) < 1000


@pytest.mark.parametrize("body", [
    {"kad": {"rule": "kad_dual", "lam": 0.4, HUGE: 1}},  # an unknown key: in the field name
    {"kad": {"rule": "kad_dual", HUGE: 0.4}},
    {"response_format": {"type": HUGE}},
    {"model": HUGE},  # "the model ... does not exist" (the app's message)
], ids=["kad-key", "kad-key-only", "response-format", "model"])
def test_no_error_quotes_a_huge_value_whole(served, body):
    path = CHAT if "messages" in body else COMPLETIONS
    response = post_json(served[0], path, {**base_body(path, MODEL), **body})
    assert response.status_code in (400, 404), response.text[:500]
    error = response.json()["error"]
    assert len(error["message"]) <= MESSAGE_LIMIT + 3, len(error["message"])
    assert len(error["param"] or "") <= ECHO_LIMIT + 3
    assert len(response.content) < 2 * MESSAGE_LIMIT


# --- every numeric field, extreme values ---------------------------------------------------
# JSON number texts (NaN and +-Infinity: tokens Python's parser accepts, as clients'
# serialisers emit them).
EXTREMES = ["0", "-0", "-0.0", "5e-324", "1e-38", "2.2250738585072014e-308", "1e308", "1",
            str(2**63 - 1), str(2**63), str(2**64), str(10**30), "-1", str(-2**63 - 1),
            "NaN", "Infinity", "-Infinity"]
# field -> the fields it needs beside it (kad parameters: a rule that takes them).
COMMON_FIELDS = {"max_tokens": {}, "temperature": {}, "top_p": {}, "top_k": {}, "seed": {},
                 "n": {}, "repetition_penalty": {}}
KAD_FIELDS = {"kad.lam": {"kad": {"rule": "kad_dual"}},
              "kad.mu": {"kad": {"rule": "kad_squared"}},
              "kad.budget": {"kad": {"rule": "kad_primal"}}}
KAD_RULE_FIELDS = {f"kad.{spec.param}@{spec.name}": {"kad": {"rule": spec.name}}
                   for spec in RULE_SPECS.values() if spec.param}
ENDPOINT_FIELDS = {
    COMPLETIONS: {**COMMON_FIELDS, "logprobs": {}, **KAD_RULE_FIELDS},
    CHAT: {**COMMON_FIELDS, "max_completion_tokens": {}, "logprobs": {},
           "top_logprobs": {"logprobs": True}, **KAD_FIELDS},
}


def random_numbers(rng: random.Random, count: int) -> list[str]:
    """JSON number texts over every magnitude: floats 1e-330 to 1e310 (overflowing to
    Infinity, underflowing to 0 or a subnormal) and integers of 0 to 100 bits, either sign."""
    out = []
    for _ in range(count):
        sign = rng.choice(["", "-"])
        kind = rng.randrange(3)
        if kind == 0:
            out.append(f"{sign}{rng.uniform(1, 10):.6f}e{rng.randint(-330, 310)}")
        elif kind == 1:
            out.append(f"{sign}{rng.getrandbits(rng.randint(1, 100))}")
        else:
            out.append(str(rng.randint(-2, 40)))  # small: mostly in range
    return out


def cases(random_per_field: int, seed: int = 20240611) -> list[tuple[str, str, bytes]]:
    """``(path, field, raw body)`` for every numeric field of both endpoints and value."""
    rng = random.Random(seed)
    out = []
    for path, fields in ENDPOINT_FIELDS.items():
        for name, beside in fields.items():
            field = name.split("@")[0]
            body = {**base_body(path, "{model}"), **beside}
            for raw in EXTREMES + random_numbers(rng, random_per_field):
                out.append((path, field, raw_body(body, field, raw)))
    return out


def check_answer(response: httpx.Response, path: str, field: str, raw: bytes) -> dict | None:
    """200, or a 400 naming ``field`` (its ``param``, or its name in the message for a
    parameter of ``kad``); the 200's body."""
    what = (path, field, raw[-160:])
    assert response.status_code in (200, 400), (*what, response.status_code,
                                                 response.text[:500])
    body = response.json()
    if response.status_code == 400:
        error = body["error"]
        leaf = field.split(".")[-1]
        named = (error["param"] in (field, leaf)
                 or re.search(rf"'{re.escape(leaf)}'|\b{re.escape(leaf)} ", error["message"]))
        assert named, (*what, error)
        return None
    assert body["kad"]["degraded_tokens"] == 0, (*what, body["kad"])
    assert all(choice["finish_reason"] in ("length", "stop") for choice in body["choices"])
    return body


def engine_problems(sampling, vocab: int) -> list[str]:
    """What about these sampling options vLLM would fail on or compute garbage with."""
    problems = []
    for name in ("max_tokens", "top_k", "seed", "logprobs"):
        value = getattr(sampling, name)
        if value is not None and not -2**63 <= value < 2**64:
            problems.append(f"{name} {value} does not fit msgpack")
    if sampling.top_k is not None and not 0 < sampling.top_k <= vocab:
        problems.append(f"top_k {sampling.top_k} outside [1, {vocab}]")
    for name in ("temperature", "top_p", "repetition_penalty"):
        if not math.isfinite(getattr(sampling, name)):
            problems.append(f"{name} is not finite")
    if sampling.repetition_penalty < MIN_REPETITION_PENALTY:
        problems.append(f"repetition_penalty {sampling.repetition_penalty} overflows logits")
    return problems


@pytest.fixture(scope="module")
def fake_app(tokenizer):
    """``(app, fake engine)``: the app on a fake engine that does not wait between tokens,
    driven in-process (hundreds of requests in a few seconds)."""
    from fake_engine import FakeEngine, fake_config

    from server.app import create_app

    engines = []

    def factory(config):
        engines.append(FakeEngine(config, tokenizer, token_delay=0.0))
        return engines[-1]

    app = create_app(fake_config(), engine_factory=factory)
    asyncio.run(engines[0].start())
    return app, engines[0]


def post_all(app, requests: list[tuple[str, bytes]], run=asyncio.run,
             concurrency: int = 16) -> list[httpx.Response]:
    """POST every ``(path, raw body)`` to ``app`` in-process, ``concurrency`` at a time, on
    the event loop ``run`` runs a coroutine on (the real engine's: its own)."""
    async def go() -> list[httpx.Response]:
        limit = asyncio.Semaphore(concurrency)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://kad",
                                     timeout=120) as http:
            async def one(path: str, raw: bytes) -> httpx.Response:
                async with limit:
                    return await http.post(path, content=raw,
                                           headers={"content-type": "application/json"})

            return await asyncio.gather(*(one(path, raw) for path, raw in requests))

    return run(go())


def test_extreme_numbers_in_every_field_are_served_or_named(fake_app):
    app, engine = fake_app
    todo = [(path, field, raw.replace(b"{model}", MODEL.encode()))
            for path, field, raw in cases(random_per_field=6)]
    assert len(todo) > 500
    responses = post_all(app, [(path, raw) for path, _, raw in todo])
    seen = {request_id: (sampling, alignment)
            for request_id, _, sampling, alignment in engine.seen}
    for (path, field, raw), response in zip(todo, responses):
        body = check_answer(response, path, field, raw)
        if body is None:
            continue
        # Every choice of a 200 went to the engine with options vLLM takes.
        for index in range(len(body["choices"])):
            sampling, alignment = seen[f"{body['id']}-{index}"]
            assert not engine_problems(sampling, TINY_VOCAB), (
                path, field, raw[-160:], engine_problems(sampling, TINY_VOCAB))
            assert alignment.param is None or math.isfinite(alignment.param)


# --- the same against the real engine --------------------------------------------------------
@pytest.fixture(scope="module")
def engine_app(tiny_engine, tiny_pair):
    """The app serving the session's tiny engine, driven in-process on the engine's loop."""
    from conftest import tiny_serve_config

    from server.app import create_app

    return create_app(tiny_serve_config(tiny_pair), engine_factory=lambda _: tiny_engine.engine)


@pytest.mark.slow
def test_extreme_numbers_on_the_real_engine_never_fail_or_degrade(tiny_engine, engine_app):
    model = tiny_engine.engine.served_model_name
    todo = [(path, field, raw.replace(b"{model}", model.encode()))
            for path, field, raw in cases(random_per_field=2)]
    # Combinations the fields' own bounds do not cover: the last seed with n choices (each
    # choice's seed is seed + its index), the smallest penalty at the coldest temperature.
    for path in (COMPLETIONS, CHAT):
        body = base_body(path, model)
        todo.append((path, "seed", json.dumps({**body, "seed": INT64_MAX, "n": 16}).encode()))
        todo.append((path, "repetition_penalty", json.dumps({
            **body, "repetition_penalty": MIN_REPETITION_PENALTY, "temperature": 1e-38,
            "max_tokens": 16}).encode()))
        todo.append((path, "top_k", json.dumps({**body, "top_k": TINY_VOCAB}).encode()))
    responses = post_all(engine_app, [(path, raw) for path, _, raw in todo],
                         run=lambda coro: tiny_engine.run(coro, timeout=600))
    served, failures = 0, []
    for (path, field, raw), response in zip(todo, responses):
        try:
            served += check_answer(response, path, field, raw) is not None
        except AssertionError as exc:  # every failure at once: a 500 and a degraded token
            failures.append(str(exc)[:400])
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures)
    assert served > 50  # the valid extremes did reach the engine
    assert tiny_engine.engine.num_unfinished_requests() == 0
