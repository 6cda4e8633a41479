"""A deterministic stand-in for the vLLM engine, for fast HTTP-layer tests.

Implements ``server.engine.interface.Engine``. Tokens are drawn from a seeded RNG over the
tokenizer's whole-word tokens (" the", " answer", ...), which re-encode to exactly the same
ids, so a test can check ``usage`` against the returned text. One token per chunk with a
short sleep, so streams interleave; stop strings use the server's own detokenizer, as the
real engine does; every request that ends without finishing is recorded as aborted.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
from collections import defaultdict

import httpx

from kad_kernels.rules import unserved_reason
from server.alignment import AlignmentSettings
from server.config import ServeConfig
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.interface import (
    GenerationChunk,
    RequestStats,
    SamplingOptions,
    TokenLogprob,
)


def word_tokens(tokenizer) -> list[int]:
    """Ids of tokens " word" that encode back to themselves (concatenations round-trip)."""
    words = []
    for token in range(len(tokenizer)):
        if token in tokenizer.all_special_ids:
            continue
        text = tokenizer.decode([token])
        if (len(text) >= 3 and text[0] == " " and text[1:].isascii() and text[1:].isalpha()
                and tokenizer.encode(text, add_special_tokens=False) == [token]):
            words.append(token)
    return words


class EngineFailure(RuntimeError):
    """What ``fail_after`` raises inside a generation (an engine crash mid-request)."""


class FakeEngine:
    def __init__(self, config: ServeConfig, tokenizer, start_delay: float = 0.0,
                 token_delay: float = 0.002, fail_start: bool = False,
                 fail_after: int | None = None, die_after: int | None = None,
                 fail_init: bool = False, metrics_registry=None) -> None:
        if fail_init:
            raise RuntimeError("fake engine cannot be built")
        self.served_model_name = config.models.served_model_name
        self.max_model_len = config.engine.max_model_len
        self.default_alignment = config.alignment
        self.tokenizer = tokenizer
        self.metrics_registry = metrics_registry  # a registry standing in for vLLM's
        self.start_delay, self.token_delay = start_delay, token_delay
        self.fail_start, self.fail_after = fail_start, fail_after
        self.die_after = die_after  # the engine dies when a request reaches this step
        self._ready = False
        self.errored = False  # tests set it to simulate a dead engine
        self.shut_down = False
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.seen: list[tuple[str, list[int], SamplingOptions, AlignmentSettings]] = []
        self._totals: dict[str, RequestStats] = defaultdict(RequestStats)
        self._pool = word_tokens(tokenizer)
        assert len(self._pool) >= 10, "the tokenizer has too few whole-word tokens"

    async def start(self) -> None:
        await asyncio.sleep(self.start_delay)
        if self.fail_start:
            raise RuntimeError("fake engine failed to load")
        self._ready = True

    @property
    def ready(self) -> bool:
        return self._ready and not self.errored

    def generate(self, request_id, prompt_token_ids, sampling, alignment):
        if not prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")
        if unserved_reason(alignment.rule):  # as the vLLM engine: a 400 for this request
            raise ValueError(unserved_reason(alignment.rule))
        self.seen.append((request_id, list(prompt_token_ids), sampling, alignment))
        return self._generate(request_id, prompt_token_ids, sampling, alignment)

    async def _generate(self, request_id, prompt, sampling: SamplingOptions, alignment):
        seed = sampling.seed if sampling.seed is not None else random.randrange(2**32)
        rng = random.Random(seed * 1_000_003 + len(prompt))
        detok = IncrementalDetokenizer(self.tokenizer, sampling.stop)
        self.running.add(request_id)
        finished = False
        uniform = -math.log(len(self._pool))
        # Scoring: the fake's log pi of each prompt token (nothing precedes the first).
        scored = None if not sampling.prompt_logprobs else [TokenLogprob(prompt[0], None)] + [
            TokenLogprob(t, uniform, tuple((u, uniform) for u in self._pool[:sampling.logprobs]))
            for t in prompt[1:]]
        try:
            if sampling.max_tokens == 0:
                finished = True
                yield GenerationChunk([], "", True, "length", RequestStats(), len(prompt), [],
                                      scored)
                return
            for step in range(sampling.max_tokens):
                await asyncio.sleep(self.token_delay)
                if self.fail_after is not None and step == self.fail_after:
                    raise EngineFailure("fake engine crashed")
                if self.die_after is not None and step == self.die_after:
                    self.errored = True
                if self.errored:  # every running request fails, as with vLLM's EngineDeadError
                    raise EngineFailure("fake engine died")
                token = rng.choice(self._pool)
                # The fake draws uniformly from its pool: every pool token has log(1/N).
                logprobs = None if sampling.logprobs is None else [TokenLogprob(
                    token, uniform,
                    tuple((t, uniform) for t in self._pool[:sampling.logprobs]))]
                text = detok.add([token])
                last = step == sampling.max_tokens - 1 or detok.stopped
                if last:
                    text += "" if detok.stopped else detok.flush()
                    emitted = len(detok.token_ids)
                    stats = RequestStats(drafted=2 * emitted, accepted=emitted, emitted=emitted,
                                         positions=emitted, alpha_sum=0.5 * emitted,
                                         deferred_positions=emitted)
                    self._totals[alignment.rule].add(stats)
                    finished = True
                    yield GenerationChunk([token], text, True,
                                          "stop" if detok.stopped else "length", stats,
                                          len(prompt), logprobs, scored)
                    return
                yield GenerationChunk([token], text, prompt_tokens=len(prompt),
                                      logprobs=logprobs, prompt_logprobs=scored)
                scored = None
        finally:
            self.running.discard(request_id)
            if not finished:
                self.aborted.append(request_id)

    def num_unfinished_requests(self) -> int:
        return len(self.running)

    def totals(self) -> dict[str, RequestStats]:
        return dict(self._totals)

    async def shutdown(self) -> None:
        self._ready = False
        self.shut_down = True


# --- serving the fake engine in tests -------------------------------------------------------
MODEL = "kad-test"


def fake_config(max_model_len: int = 256, **server) -> ServeConfig:
    """A config for the fake engine (model paths unused); ``server`` overrides ServerSettings."""
    return ServeConfig.model_validate({
        "models": {"target": "unused", "draft": "unused", "served_model_name": MODEL},
        "engine": {"max_model_len": max_model_len},
        "server": {"max_waiting_requests": 64, **server},
    })


@functools.cache
def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def serve_fake(tokenizer, engine_options: dict | None = None, max_model_len: int = 256,
               **server):
    """(ServerThread, FakeEngine): the real app on a free port with a fake engine."""
    from serving import ServerThread

    from server.app import create_app

    engines: list[FakeEngine] = []

    def factory(config: ServeConfig) -> FakeEngine:
        engines.append(FakeEngine(config, tokenizer, **(engine_options or {})))
        return engines[-1]

    app = create_app(fake_config(max_model_len, **server), engine_factory=factory)
    return ServerThread(app), engines[0]


def post_json(url: str, path: str, body) -> httpx.Response:
    """POST a JSON body (a dict, or raw bytes sent as they are: malformed JSON tests)."""
    if isinstance(body, bytes):
        return httpx.post(f"{url}{path}", content=body,
                          headers={"content-type": "application/json"})
    return httpx.post(f"{url}{path}", json=body)


def check_openai_error(response: httpx.Response, status: int, field: str | None) -> None:
    """An error response in OpenAI's shape, naming ``field`` (in ``param`` or the message),
    with none of pydantic's or FastAPI's internals showing through."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert "pydantic" not in response.text and "errors.pydantic.dev" not in response.text
    assert "detail" not in response.json() and "loc" not in error
    assert "None" not in error["message"]
    if field:
        assert field in (error["param"] or "") + error["message"], error
    # No pydantic internals: union members ("prompt.list[int].0"), stack-trace pointers.
    assert "[" not in (error["param"] or "") and "stack trace" not in error["message"]
