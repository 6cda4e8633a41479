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
