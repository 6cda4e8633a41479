"""The official ``openai`` client against the server: chat and completions, streaming and
not, ``n``, ``stop``, ``seed``, ``extra_body={"kad": ...}`` and usage.

Every test takes the ``api`` fixture (URL, model name, tokenizer, fake engine or None), so
the same tests run against any engine: by default the fake one; with
``KAD_API_TESTS_VLLM=1`` also a real ``python -m server`` process on the tiny pair with the
vLLM engine (slow). Another engine is one more entry in ``SERVERS``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from fake_engine import MODEL, FakeEngine, load_tokenizer, serve_fake
from waiting import wait_ready


@dataclass
class ApiTarget:
    url: str
    model: str
    tokenizer: Any
    default_rule: str
    engine: FakeEngine | None  # None for a real engine: fake-only checks are skipped
    # True when output tokens re-encode to themselves (the fake engine's whole words):
    # then usage can be checked against the returned text token by token.
    exact_retokenization: bool


def _fake_server(tiny_pair):
    thread, engine = serve_fake(load_tokenizer(str(tiny_pair.draft)))
    try:
        wait_ready(thread.url)
        yield ApiTarget(thread.url, MODEL, engine.tokenizer, "kad_dual", engine, True)
    finally:
        thread.stop()


def _vllm_server(tiny_pair):
    """``python -m server`` with the real vLLM engine on the tiny pair (about a minute)."""
    import signal
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import yaml
    from serving import free_port

    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="kad-api-vllm-"))
    (workdir / "config.yaml").write_text(yaml.safe_dump({
        "models": {"target": str(tiny_pair.target), "draft": str(tiny_pair.draft),
                   "served_model_name": "kad-tiny"},
        "engine": {"num_speculative_tokens": 3, "dtype": "float32", "max_model_len": 512,
                   "cpu_kv_cache_gib": 1, "max_num_seqs": 32},
        "server": {"host": "127.0.0.1", "port": port},
    }))
    with open(workdir / "server.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "--config", str(workdir / "config.yaml"),
             "--log-level", "warning"],
            cwd=Path(__file__).resolve().parent.parent, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=600, process=process)
        yield ApiTarget(url, "kad-tiny", load_tokenizer(str(tiny_pair.draft)), "kad_dual",
                        None, False)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


SERVERS = {"fake": _fake_server}
if os.environ.get("KAD_API_TESTS_VLLM"):
    SERVERS["vllm"] = _vllm_server


@pytest.fixture(scope="module", params=sorted(SERVERS))
def api(request, tiny_pair):
    starter = SERVERS[request.param](tiny_pair)
    yield next(starter)
    starter.close()


@pytest.fixture
def client(api):
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)


def chat_prompt_ids(api: ApiTarget, messages: list[dict]) -> list[int]:
    text = api.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
    return api.tokenizer.encode(text, add_special_tokens=False)


def check_usage(api: ApiTarget, texts: list[str], finish: list[str], usage) -> None:
    """completion_tokens == the token count of the returned text (whole-word fake tokens),
    and total = prompt + completion."""
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if api.exact_retokenization and all(reason == "length" for reason in finish):
        counted = sum(len(api.tokenizer.encode(t, add_special_tokens=False)) for t in texts)
        assert usage.completion_tokens == counted


def test_chat_completion(client, api):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+2?"}]
    response = client.chat.completions.create(model=api.model, messages=messages,
                                              max_tokens=12, seed=3,
                                              extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and response.usage.completion_tokens == 12
    assert response.usage.prompt_tokens == len(chat_prompt_ids(api, messages))
    check_usage(api, [choice.message.content], [choice.finish_reason], response.usage)
    kad = response.model_extra["kad"]
    assert kad["rule"] == api.default_rule
    assert kad["emitted_tokens"] == 12 and kad["accepted_tokens"] <= kad["drafted_tokens"]
    assert 0.0 <= kad["acceptance_rate"] <= 1.0 and 0.0 <= kad["mean_deferred_mass"] <= 1.0


def test_extra_body_kad_reaches_the_engine(client, api):
    response = client.chat.completions.create(
        model=api.model, messages=[{"role": "user", "content": "hi"}], max_tokens=5, seed=8,
        extra_body={"kad": {"rule": "kad_primal", "budget": 0.7}},
    )
    kad = response.model_extra["kad"]
    assert kad["rule"] == "kad_primal" and kad["param"] == 0.7
    if api.engine is not None:
        _, prompt, sampling, alignment = api.engine.seen[-1]
        assert alignment.rule == "kad_primal" and alignment.budget == 0.7
        assert sampling.seed == 8 and sampling.max_tokens == 5
        assert prompt == chat_prompt_ids(api, [{"role": "user", "content": "hi"}])


def test_completion_n_and_seed_reproducibility(client, api):
    first = client.completions.create(model=api.model, prompt="Hello there", max_tokens=8,
                                      n=2, seed=5, extra_body={"ignore_eos": True})
    again = client.completions.create(model=api.model, prompt="Hello there", max_tokens=8,
                                      n=2, seed=5, extra_body={"ignore_eos": True})
    assert first.object == "text_completion"
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.choices[0].text != first.choices[1].text  # choice i runs with seed + i
    assert first.usage.completion_tokens == 16
    assert first.usage.prompt_tokens == len(api.tokenizer.encode("Hello there",
                                                                  add_special_tokens=False))
    check_usage(api, [c.text for c in first.choices],
                [c.finish_reason for c in first.choices], first.usage)
    other = client.completions.create(model=api.model, prompt="Hello there", max_tokens=8,
                                      seed=6, extra_body={"ignore_eos": True})
    assert other.choices[0].text == first.choices[1].text  # seed 6 == seed 5 + choice 1


def test_completion_list_of_prompts_and_token_ids(client, api):
    ids = api.tokenizer.encode("Once upon", add_special_tokens=False)
    response = client.completions.create(model=api.model, prompt=["Once upon", "a time"],
                                         max_tokens=4, n=2, seed=1,
                                         extra_body={"ignore_eos": True})
    assert sorted(c.index for c in response.choices) == [0, 1, 2, 3]
    assert response.usage.completion_tokens == 16
    by_ids = client.completions.create(model=api.model, prompt=ids, max_tokens=4, seed=1,
                                       extra_body={"ignore_eos": True})
    text = {c.index: c.text for c in response.choices}
    assert by_ids.choices[0].text == text[0]  # same prompt ids, same seed, same text


def test_stop_sequences(client, api):
    free = client.completions.create(model=api.model, prompt="Hi", max_tokens=20, seed=9,
                                     extra_body={"ignore_eos": True})
    text = free.choices[0].text
    assert len(text) >= 6
    stop = text[len(text) // 2: len(text) // 2 + 2]  # from the middle of the output
    cut = client.completions.create(model=api.model, prompt="Hi", max_tokens=20, seed=9,
                                    stop=[stop, "\u2603never"],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    streamed = client.completions.create(model=api.model, prompt="Hi", max_tokens=20, seed=9,
                                         stop=stop, stream=True,
                                         extra_body={"ignore_eos": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_completion_tokens(client, api):
    response = client.chat.completions.create(
        model=api.model, messages=[{"role": "user", "content": "hi"}],
        max_completion_tokens=3, seed=2, extra_body={"ignore_eos": True},
    )
    assert response.usage.completion_tokens == 3
    assert response.choices[0].finish_reason == "length"


def test_streaming_chat_equals_non_streaming(client, api):
    kwargs = {"model": api.model, "messages": [{"role": "user", "content": "hi"}],
                  "max_tokens": 10, "seed": 1, "extra_body": {"ignore_eos": True}}
    chunks = list(client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    usage_chunk = chunks[-1]
    assert not usage_chunk.choices and usage_chunk.usage.completion_tokens == 10
    assert usage_chunk.model_extra["kad"]["emitted_tokens"] == 10
    plain = client.chat.completions.create(**kwargs)
    assert text == plain.choices[0].message.content
    assert usage_chunk.usage.prompt_tokens == plain.usage.prompt_tokens
    without_usage = list(client.chat.completions.create(stream=True, **kwargs))
    assert all(c.usage is None for c in without_usage)


def test_streaming_completions_with_n(client, api):
    kwargs = {"model": api.model, "prompt": "Count", "max_tokens": 6, "n": 2, "seed": 4,
                  "extra_body": {"ignore_eos": True}}
    chunks = list(client.completions.create(stream=True,
                                            stream_options={"include_usage": True}, **kwargs))
    texts = {0: "", 1: ""}
    reasons = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    plain = client.completions.create(**kwargs)
    assert texts == {c.index: c.text for c in plain.choices}
    assert reasons == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == 12
    check_usage(api, list(texts.values()), list(reasons.values()), chunks[-1].usage)


def test_models_endpoint(client, api):
    models = client.models.list()
    assert [m.id for m in models.data] == [api.model]


def _fake_logprob(api: ApiTarget) -> float | None:
    """The fake engine's log pi of every token (uniform over its pool); None for vLLM."""
    import math

    return None if api.engine is None else -math.log(len(api.engine._pool))


def test_chat_logprobs_and_top_logprobs(client, api):
    response = client.chat.completions.create(
        model=api.model, messages=[{"role": "user", "content": "Say something."}],
        max_tokens=8, seed=5, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    choice = response.choices[0]
    content = choice.logprobs.content
    assert len(content) == response.usage.completion_tokens == 8
    assert "".join(entry.token for entry in content) == choice.message.content
    for entry in content:
        assert bytes(entry.bytes) == entry.token.encode("utf-8")
        assert len(entry.top_logprobs) == 3
        values = [top.logprob for top in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and entry.logprob <= values[0] + 1e-6
        assert -9999.0 <= entry.logprob <= 0.0
        if _fake_logprob(api) is not None:
            assert entry.logprob == pytest.approx(_fake_logprob(api))
    # Without logprobs the field is null; logprobs without top_logprobs: no alternatives.
    plain = client.chat.completions.create(
        model=api.model, messages=[{"role": "user", "content": "x"}], max_tokens=2, seed=5)
    assert plain.choices[0].logprobs is None
    own = client.chat.completions.create(
        model=api.model, messages=[{"role": "user", "content": "x"}], max_tokens=2, seed=5,
        logprobs=True)
    assert [e.top_logprobs for e in own.choices[0].logprobs.content] == [[], []]


def test_completion_logprobs_streamed_equal_non_streamed(client, api):
    request = {"model": api.model, "prompt": "Once upon a time", "max_tokens": 10,
               "seed": 11, "logprobs": 2, "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(**request)
    logprobs = whole.choices[0].logprobs
    text = whole.choices[0].text
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 10
    assert "".join(logprobs.tokens) == text
    # text_offset: where each token's text starts in the returned text.
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i])
                                    for i in range(10)]
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs,
                                 logprobs.top_logprobs):
        # The token itself and its top 2 alternatives (vLLM's shape): greedy-ness decidable.
        assert token in top and top[token] == value and len(top) <= 3
        assert max(top.values()) >= value
    tokens, values, offsets = [], [], []
    for chunk in client.completions.create(stream=True, **request):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                values += choice.logprobs.token_logprobs
                offsets += choice.logprobs.text_offset
    if api.engine is not None:  # same seed, same tokens (the fake engine is deterministic)
        assert tokens == logprobs.tokens and offsets == logprobs.text_offset
        assert values == pytest.approx(logprobs.token_logprobs)
    assert len(tokens) == 10 and offsets == [sum(len(t) for t in tokens[:i]) for i in range(10)]


def test_completion_echo_returns_the_prompt_first(client, api):
    prompt = "The prompt comes back"
    whole = client.completions.create(model=api.model, prompt=prompt, max_tokens=3, seed=2,
                                      echo=True, extra_body={"ignore_eos": True})
    assert whole.choices[0].text.startswith(prompt)
    assert len(whole.choices[0].text) > len(prompt)
    streamed = "".join(choice.text for chunk in client.completions.create(
        model=api.model, prompt=prompt, max_tokens=3, seed=2, echo=True, stream=True,
        extra_body={"ignore_eos": True}) for choice in chunk.choices)
    assert streamed.startswith(prompt)
    if api.engine is not None:
        assert streamed == whole.choices[0].text


def test_harness_shaped_scoring_request(api):
    """What lm-evaluation-harness sends for log-likelihoods: token-id prompts in a batch,
    ``max_tokens 1, logprobs 1, echo, temperature 0``. It reads ``token_logprobs``,
    ``top_logprobs`` and ``tokens``; the first prompt token has null values."""
    import httpx

    prompts = [api.tokenizer.encode("The capital of France is Paris"),
               api.tokenizer.encode("Two plus two equals four")]
    response = httpx.post(f"{api.url}/v1/completions", timeout=300, json={
        "model": api.model, "prompt": prompts, "max_tokens": 1, "logprobs": 1, "echo": True,
        "temperature": 0, "seed": 1234})
    assert response.status_code == 200, response.text
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    for prompt, choice in zip(prompts, choices):
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(prompt) + 1  # the prompt, then one token
        assert logprobs["tokens"][:len(prompt)] == [api.tokenizer.decode([t]) for t in prompt]
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert all(v <= 0.0 for v in logprobs["token_logprobs"][1:])
        assert choice["text"].startswith(api.tokenizer.decode(prompt))
        for token, value, top in zip(logprobs["tokens"][1:], logprobs["token_logprobs"][1:],
                                     logprobs["top_logprobs"][1:]):
            assert top[token] == value and len(top) <= 2
        # The generated token of a temperature-0 request is the argmax of pi: greedy in
        # the harness's sense (its value is the largest of its top_logprobs).
        last = logprobs["top_logprobs"][-1]
        assert last[logprobs["tokens"][-1]] == max(last.values())
        if _fake_logprob(api) is not None:
            assert logprobs["token_logprobs"][1:] == pytest.approx(
                [_fake_logprob(api)] * len(prompt))
    # max_tokens 0: the prompt's values only.
    only = httpx.post(f"{api.url}/v1/completions", timeout=300, json={
        "model": api.model, "prompt": prompts[0], "max_tokens": 0, "logprobs": 0,
        "echo": True}).json()
    assert len(only["choices"][0]["logprobs"]["tokens"]) == len(prompts[0])
    assert only["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(
        logprobs_of(choices[0])[1:len(prompts[0])])
    assert only["usage"]["completion_tokens"] == 0


def logprobs_of(choice: dict) -> list:
    return choice["logprobs"]["token_logprobs"]


def test_streamed_scoring_sends_the_scored_prompt_first(client, api):
    chunks = list(client.completions.create(
        model=api.model, prompt="Score this prompt", max_tokens=2, logprobs=1, echo=True,
        stream=True, temperature=0, extra_body={"ignore_eos": True}))
    first = next(c.choices[0] for c in chunks if c.choices and c.choices[0].logprobs)
    prompt_ids = api.tokenizer.encode("Score this prompt")
    assert first.text == api.tokenizer.decode(prompt_ids)
    assert first.logprobs.token_logprobs[0] is None
    assert len(first.logprobs.tokens) == len(prompt_ids)
    assert first.logprobs.text_offset[0] == 0
