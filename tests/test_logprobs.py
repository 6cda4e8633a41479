"""Logprobs of generated tokens are log pi, exactly, at the shipped gamma 5.

Oracle: the reference decoder's pi at temperature 1 (the unscaled distributions) for the
prefix each token was generated after, whatever temperature/top-k/top-p the request
samples with (vLLM's default ``raw_logprobs`` semantics, applied to pi).
"""

from __future__ import annotations

import math

import pytest

from kad_kernels.rules import TWO_MODEL_RULES
from server.alignment import AlignmentSettings
from server.engine.interface import SamplingOptions

pytestmark = pytest.mark.slow

PROMPT_TEXT = "Question: what is two plus two?\nAnswer:"
TOP = 5
TOLERANCE = 1e-4
SAMPLINGS = {
    "greedy": {"temperature": 0.0},
    "t0.7-topk-topp": {"temperature": 0.7, "top_k": 40, "top_p": 0.9},
    "t1": {"temperature": 1.0},
}


def _check_against_reference(result, prompt, reference, rule):
    assert result.logprobs is not None and len(result.logprobs) == len(result.token_ids)
    for t, (token, entry) in enumerate(zip(result.token_ids, result.logprobs)):
        assert entry.token_id == token
        _, _, pi = reference.next_distributions(prompt + result.token_ids[:t])
        log_pi = pi.double().log()
        assert abs(entry.logprob - float(log_pi[token])) < TOLERANCE, (rule, t)
        assert len(entry.top) == TOP
        expected = sorted(range(len(pi)), key=lambda i: -float(pi[i]))[:TOP]
        for (got_id, got_lp), want_id in zip(entry.top, expected):
            assert abs(got_lp - float(log_pi[got_id])) < TOLERANCE, (rule, t)
            # The same ranking (a different id only where two values tie).
            assert got_id == want_id or abs(float(log_pi[got_id] - log_pi[want_id])) < 1e-5


@pytest.mark.parametrize("sampling_name", list(SAMPLINGS))
def test_generated_token_logprobs_are_log_pi_for_every_rule(production_engine,
                                                             reference_factory,
                                                             sampling_name):
    sampling = SAMPLINGS[sampling_name]
    prompt = production_engine.engine.tokenizer.encode(PROMPT_TEXT)
    rules = list(TWO_MODEL_RULES)
    alignments = [AlignmentSettings.paper_default(rule) for rule in rules]
    results = production_engine.complete_many(
        [prompt] * len(rules),
        [SamplingOptions(max_tokens=12, seed=7 + i, ignore_eos=True, logprobs=TOP, **sampling)
         for i in range(len(rules))],
        alignments, timeout=600,
    )
    for rule, alignment, result in zip(rules, alignments, results):
        assert len(result.token_ids) == 12
        reference = reference_factory(rule, alignment.param, temperature=1.0)
        _check_against_reference(result, prompt, reference, rule)


def test_logprobs_are_not_those_of_p(production_engine, reference_factory):
    """Where pi and p differ, the reported values are pi's (the hook is not bypassed)."""
    prompt = production_engine.engine.tokenizer.encode(PROMPT_TEXT)
    result = production_engine.complete_many(
        [prompt], [SamplingOptions(max_tokens=6, seed=3, logprobs=0, ignore_eos=True)],
        [AlignmentSettings(rule="aligned")], timeout=300)[0]
    reference = reference_factory("aligned", None, temperature=1.0)
    gaps = []
    for t, entry in enumerate(result.logprobs):
        p, q_star, _ = reference.next_distributions(prompt + result.token_ids[:t])
        assert abs(entry.logprob - math.log(float(q_star[entry.token_id]))) < TOLERANCE
        gaps.append(abs(entry.logprob - math.log(float(p[entry.token_id]))))
        assert entry.top == ()
    assert max(gaps) > 0.05


SCORED_TEXT = ("Question: Tom has three apples and buys two more. How many apples does he "
               "have now?\nAnswer: five apples. The end.")


@pytest.mark.parametrize("sampling_name", ["greedy", "t0.7-topk-topp"])
def test_prompt_scoring_is_log_pi_at_every_position_for_every_rule(
        production_engine, reference_factory, sampling_name):
    """echo + logprobs: every prompt token from the second on gets log pi given the tokens
    before it (from one prefill of each model), then the request generates as usual."""
    prompt = production_engine.engine.tokenizer.encode(SCORED_TEXT)
    assert len(prompt) > 20
    rules = list(TWO_MODEL_RULES)
    alignments = [AlignmentSettings.paper_default(rule) for rule in rules]
    results = production_engine.complete_many(
        [prompt] * len(rules),
        [SamplingOptions(max_tokens=2, seed=i, logprobs=2, prompt_logprobs=True,
                         ignore_eos=True, **SAMPLINGS[sampling_name])
         for i in range(len(rules))],
        alignments, timeout=900,
    )
    for rule, alignment, result in zip(rules, alignments, results):
        scores = result.prompt_logprobs
        assert [entry.token_id for entry in scores] == prompt, rule
        assert scores[0].logprob is None
        reference = reference_factory(rule, alignment.param, temperature=1.0)
        for t in range(1, len(prompt)):
            _, _, pi = reference.next_distributions(prompt[:t])
            log_pi = pi.double().log()
            assert abs(scores[t].logprob - float(log_pi[prompt[t]])) < TOLERANCE, (rule, t)
            assert scores[t].top[0][0] == int(pi.argmax()) or abs(
                scores[t].top[0][1] - float(log_pi.max())) < 1e-5
        # The generated tokens after the prompt: log pi too, given the whole prompt.
        assert len(result.token_ids) == 2 and len(result.logprobs) == 2
        _, _, pi = reference.next_distributions(prompt)
        assert abs(result.logprobs[0].logprob - math.log(float(pi[result.token_ids[0]]))) \
            < TOLERANCE


def test_prompt_scoring_with_no_generation(production_engine, reference_factory):
    """max_tokens 0 (what scoring clients send with echo): the prompt's values only."""
    prompt = production_engine.engine.tokenizer.encode(SCORED_TEXT)
    result = production_engine.complete_many(
        [prompt], [SamplingOptions(max_tokens=0, temperature=0.0, logprobs=0,
                                   prompt_logprobs=True)],
        [AlignmentSettings.paper_default("kad_dual")], timeout=300)[0]
    assert result.token_ids == [] and result.finish_reason == "length"
    assert [entry.token_id for entry in result.prompt_logprobs] == prompt
    reference = reference_factory("kad_dual", 0.4, temperature=1.0)
    _, _, pi = reference.next_distributions(prompt[:-1])
    assert abs(result.prompt_logprobs[-1].logprob - math.log(float(pi[prompt[-1]]))) \
        < TOLERANCE


def test_scoring_joining_a_running_batch_is_exact(production_engine, reference_factory):
    """Scoring requests that arrive while other requests decode (lm-evaluation-harness with
    ``num_concurrent`` > 1, or scoring beside chat traffic): each joins with its one-token
    prompt padded with placeholder drafts, which once let a sampled token replace prompt
    token 2 and shifted every value after it. Every scored position from 2 on must be
    log pi, for every request, rule and sampling setting."""
    import asyncio
    import random

    rng = random.Random(19)
    vocab = production_engine.engine.tokenizer.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randrange(20, 60))]
               for _ in range(24)]
    rules = ["kad_dual", "confidence_bet"]
    samplings = ["greedy", "t0.7-topk-topp"]
    settings = [(rules[i % 2], samplings[(i // 2) % 2]) for i in range(len(prompts))]

    async def load():
        streams = [production_engine.complete(
            [rng.randrange(3, vocab) for _ in range(12)],
            SamplingOptions(max_tokens=200, temperature=0.8, seed=i, ignore_eos=True),
            AlignmentSettings.paper_default(rules[i % 2])) for i in range(4)]

        async def score(i):
            await asyncio.sleep(0.05 * (i + 1))
            rule, sampling = settings[i]
            return await production_engine.complete(
                prompts[i], SamplingOptions(max_tokens=1, seed=1234, logprobs=1,
                                            prompt_logprobs=True, **SAMPLINGS[sampling]),
                AlignmentSettings.paper_default(rule))

        results = await asyncio.gather(*streams, *(score(i) for i in range(len(prompts))))
        return results[len(streams):]

    results = production_engine.run(load(), timeout=900)
    references = {rule: reference_factory(rule, AlignmentSettings.paper_default(rule).param,
                                          temperature=1.0) for rule in rules}
    for prompt, (rule, sampling), result in zip(prompts, settings, results):
        scores = result.prompt_logprobs
        assert [entry.token_id for entry in scores] == prompt, (rule, sampling)
        assert result.stats.inexact == 0 and result.stats.degraded == 0
        for t in range(2, len(prompt)):
            _, _, pi = references[rule].next_distributions(prompt[:t])
            want = float(pi[prompt[t]])
            # Random prompts reach tokens of pi ~ 1e-10, whose float32 logs carry ~1e-4
            # relative noise: log pi to TOLERANCE where pi > 1e-3, pi itself to 1e-5 everywhere.
            assert abs(math.exp(scores[t].logprob) - want) < 1e-5, (rule, sampling, t)
            if want > 1e-3:
                assert abs(scores[t].logprob - math.log(want)) < TOLERANCE, (rule, sampling, t)


def test_scoring_beside_a_generation_that_starts_with_end_of_text_in_the_same_steps(
        production_engine, reference_factory):
    """Two different requests in the same steps, found by request id: a scored prompt and a
    seeded generation whose prompt starts with the end-of-text token. Together, each gives
    exactly what it gives alone, and the scored positions are log pi."""
    import asyncio
    import random

    rng = random.Random(23)
    tokenizer = production_engine.engine.tokenizer
    vocab = tokenizer.vocab_size
    eos = tokenizer.eos_token_id
    assert eos is not None
    generation_prompt = [eos] + [rng.randrange(3, vocab) for _ in range(10)]
    scored_prompt = [rng.randrange(3, vocab) for _ in range(48)]
    alignment = AlignmentSettings.paper_default("kad_dual")

    def generate():
        return production_engine.complete(
            generation_prompt,
            SamplingOptions(max_tokens=40, temperature=0.8, top_k=40, seed=5, logprobs=1,
                            ignore_eos=True), alignment)

    def score():
        return production_engine.complete(
            scored_prompt, SamplingOptions(max_tokens=1, temperature=0.0, logprobs=1,
                                           prompt_logprobs=True), alignment)

    alone = [production_engine.run(generate(), timeout=600),
             production_engine.run(score(), timeout=600)]

    async def together():
        return await asyncio.gather(generate(), score())

    for _ in range(3):
        both = production_engine.run(together(), timeout=600)
        for mine, single in zip(both, alone):
            assert mine.token_ids == single.token_ids
            assert mine.stats.inexact == 0 and mine.stats.degraded == 0
            for a, b in zip(mine.logprobs, single.logprobs):
                assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-5
        scores = both[1].prompt_logprobs
        assert [entry.token_id for entry in scores] == scored_prompt
        assert all(abs(a.logprob - b.logprob) < 1e-5
                   for a, b in zip(scores[1:], alone[1].prompt_logprobs[1:]))
    reference = reference_factory("kad_dual", alignment.param, temperature=1.0)
    for t in range(2, len(scored_prompt)):
        _, _, pi = reference.next_distributions(scored_prompt[:t])
        assert abs(math.exp(scores[t].logprob) - float(pi[scored_prompt[t]])) < 1e-5, t


@pytest.mark.parametrize("rule", ["kad_dual", "confidence_bet"])
def test_pairs_of_scoring_requests_sent_together_each_equal_alone_and_pi(
        production_engine, reference_factory, rule):
    """What lm-evaluation-harness with ``num_concurrent`` > 1 sends: two scoring requests
    (30 and 255 tokens, one greedy, one sampled with top-k/top-p) at the same time, four
    times over. Every response equals the same request sent alone, and every scored
    position from 2 on is the reference decoder's pi."""
    import asyncio
    import random

    rng = random.Random(29)
    vocab = production_engine.engine.tokenizer.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (30, 255)]
    samplings = [SAMPLINGS["greedy"], SAMPLINGS["t0.7-topk-topp"]]
    alignment = AlignmentSettings.paper_default(rule)

    def score(i):
        return production_engine.complete(
            prompts[i], SamplingOptions(max_tokens=1, seed=1234, logprobs=1,
                                        prompt_logprobs=True, **samplings[i]), alignment)

    alone = [production_engine.run(score(i), timeout=600) for i in range(2)]

    async def pair():
        return await asyncio.gather(score(0), score(1))

    reference = reference_factory(rule, alignment.param, temperature=1.0)
    for i, prompt in enumerate(prompts):
        scores = alone[i].prompt_logprobs
        assert [entry.token_id for entry in scores] == prompt
        for t in range(2, len(prompt)):
            _, _, pi = reference.next_distributions(prompt[:t])
            assert abs(math.exp(scores[t].logprob) - float(pi[prompt[t]])) < 1e-5, (i, t)
    for _ in range(4):
        for together, single in zip(production_engine.run(pair(), timeout=600), alone):
            assert together.stats.inexact == 0 and together.stats.degraded == 0
            assert [e.token_id for e in together.prompt_logprobs] == \
                [e.token_id for e in single.prompt_logprobs]
            assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in
                       zip(together.prompt_logprobs[1:], single.prompt_logprobs[1:]))
