"""Opt-in: the engine on a real model pair (``pytest -m real``).

Needs ``KAD_REAL_PAIR``: the folder ``../shared/tools/real-pair/build.sh`` fills with
``qwen2.5-coder-1.5b-instruct`` (p) and ``qwen2.5-coder-0.5b-instruct`` (q*), Hugging Face
folders with one 151,936-token vocabulary and a ChatML template. Checks what the tiny pair
cannot: the real chat template, greedy ``aligned`` against the small model's own greedy
decoding in transformers, and the first token of ``kad_dual`` against pi at full vocabulary.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from test_engine import pooled_chi_square_pvalue, tv

from server.alignment import AlignmentSettings
from server.engine.interface import SamplingOptions

pytestmark = [pytest.mark.real, pytest.mark.slow]

PAIR = os.environ.get("KAD_REAL_PAIR")
if not PAIR:
    pytest.skip("KAD_REAL_PAIR is not set (build the pair with "
                "../shared/tools/real-pair/build.sh, then export KAD_REAL_PAIR)",
                allow_module_level=True)

TARGET = Path(PAIR) / "qwen2.5-coder-1.5b-instruct"
DRAFT = Path(PAIR) / "qwen2.5-coder-0.5b-instruct"
MESSAGES = [{"role": "user", "content": "What is 17 * 23? Answer with the number."}]


@pytest.fixture(scope="module")
def expected():
    """What transformers computes (float32), before the engine starts: the two models and
    the engine do not fit in memory together on a small machine."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.prompts import encode_chat, render_chat

    tokenizer = AutoTokenizer.from_pretrained(DRAFT)
    prompt = encode_chat(tokenizer, render_chat(tokenizer, MESSAGES))
    template = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                             tokenize=True)
    out = {"prompt": prompt,
           "template": list(template["input_ids"] if hasattr(template, "keys") else template)}
    with torch.no_grad():
        draft = AutoModelForCausalLM.from_pretrained(DRAFT, torch_dtype=torch.float32).eval()
        ids = torch.tensor([prompt])
        out["greedy"] = draft.generate(ids, max_new_tokens=32, do_sample=False)[0, len(prompt):]
        out["q_star"] = torch.softmax(draft(ids).logits[0, -1].float(), -1)
        del draft
        gc.collect()
        target = AutoModelForCausalLM.from_pretrained(TARGET, torch_dtype=torch.float32).eval()
        out["p"] = torch.softmax(target(ids).logits[0, -1].float(), -1)
        del target
        gc.collect()
    out["greedy"] = out["greedy"].tolist()
    return out


@pytest.fixture(scope="module")
def real_engine(expected):
    from bench.background import BackgroundEngine
    from server.config import ServeConfig
    from server.engine import build_engine

    config = ServeConfig.model_validate({
        "models": {"target": str(TARGET), "draft": str(DRAFT), "served_model_name": "real"},
        "engine": {"num_speculative_tokens": 3, "dtype": "float32", "max_model_len": 1024,
                   "max_num_seqs": 8, "cpu_kv_cache_gib": 2, "enforce_eager": True},
    })
    engine = BackgroundEngine(build_engine(config))
    engine.start(timeout=1800)
    yield engine
    engine.close()


def test_the_chat_template_renders_as_the_aligned_model_expects(real_engine, expected):
    """The server's chat rendering (special tokens in content escaped) gives exactly the
    ids of the aligned model's own template."""
    from server.prompts import encode_chat, render_chat

    tokenizer = real_engine.engine.tokenizer
    assert encode_chat(tokenizer, render_chat(tokenizer, MESSAGES)) == expected["template"]
    assert expected["prompt"] == expected["template"]


def test_greedy_aligned_is_the_small_models_own_greedy(real_engine, expected):
    got = real_engine.complete_many(
        [expected["prompt"]],
        [SamplingOptions(max_tokens=len(expected["greedy"]), temperature=0.0)],
        [AlignmentSettings(rule="aligned")], timeout=900)[0]
    assert got.token_ids == expected["greedy"]
    assert got.stats.inexact == 0


def test_first_token_of_kad_dual_is_pi_at_full_vocabulary(real_engine, expected):
    from kad_kernels import mix

    p, q_star = expected["p"], expected["q_star"]
    assert p.shape[-1] == 151_936
    pi = mix(p, q_star, "kad_dual", 0.4)
    n = 400
    results = real_engine.complete_many(
        [expected["prompt"]] * n,
        [SamplingOptions(max_tokens=1, seed=7_000 + i) for i in range(n)],
        [AlignmentSettings(rule="kad_dual", lam=0.4)] * n, timeout=1800)
    counts = Counter(r.token_ids[0] for r in results)
    assert pooled_chi_square_pvalue(counts, pi, n) > 1e-3, tv(counts, pi, n)


@pytest.fixture(scope="module")
def real_client():
    """The ``openai`` client of a real server on the pair (gamma 3, compact JSON, the
    hermes tool parser)."""
    from types import SimpleNamespace

    import openai
    from server_process import running_server

    with running_server(SimpleNamespace(target=TARGET, draft=DRAFT), "kad-real-",
                        gamma=3, max_model_len=2048, engine={"json_compact": True},
                        server={"tool_call_parser": "hermes"}) as running:
        yield openai.OpenAI(base_url=f"{running['url']}/v1", api_key="unused",
                            max_retries=0, timeout=600)


def test_the_pair_answers_in_a_json_schema_through_the_openai_client(real_client):
    """response_format from a pydantic model (the client's ``parse``), greedy over pi under
    kad_dual: the answer parses into the model, and it is the right one."""
    from pydantic import BaseModel

    class FunctionFacts(BaseModel):
        language: str
        function_name: str
        is_recursive: bool

    completion = real_client.beta.chat.completions.parse(
        model="kad-tiny", temperature=0, max_tokens=64, response_format=FunctionFacts,
        messages=[{"role": "user", "content": "Describe `def factorial(n): return 1 if n "
                   "< 2 else n * factorial(n - 1)` as JSON."}],
        extra_body={"kad": {"rule": "kad_dual", "lam": 0.4}})
    print(completion.choices[0].message.content, completion.usage)  # shown with -s
    facts = completion.choices[0].message.parsed
    assert facts.function_name == "factorial" and facts.is_recursive
    assert facts.language.lower() == "python"
    assert completion.model_extra["kad"]["inexact_tokens"] == 0


def test_the_pair_calls_a_function_through_the_openai_client(real_client):
    """tool_choice required, greedy over pi: the real pair asked for the weather calls
    ``get_weather`` with the city, the call forced by vLLM's JSON schema for required tools
    under pi. (Under ``auto`` with the hermes parser this pair answers with the call's JSON
    but without the ``<tool_call>`` tags hermes reads, as its 0.5B draft alone does: plain
    text, a property of the models.)"""
    import json

    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    choice = real_client.chat.completions.create(
        model="kad-tiny", tools=tools, tool_choice="required", parallel_tool_calls=False,
        temperature=0, max_tokens=64,
        messages=[{"role": "user", "content": "What is the weather like in Paris?"}],
    ).choices[0]
    print(choice.model_dump_json())  # shown with -s: the call the pair made
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id
    assert "paris" in json.loads(call.function.arguments)["city"].lower()
