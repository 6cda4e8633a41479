"""Biases, bans and min_tokens under pi, at the shipped gamma 5 with temperature and top-k.

A soft ``logit_bias`` moves p before mixing, as vLLM biases its target. Anything that
forbids a token (a bias of -100, ``bad_words``, ``min_tokens``) holds on pi itself: q* can
carry mass onto a token p no longer has, so pi is masked after mixing and renormalised.
Both paths are checked where the token is sampled: the first output token (sampled from
vLLM's processed p at prefill and corrected to pi) and the second (verified drafts, where
vLLM 0.32's rejection sampler applies no logit bias and the hook adds it).

The reference is the reference decoder's pi with the same bias (``logit_bias``) or the
same tokens forbidden (``allowed``).
"""

from __future__ import annotations

from collections import Counter

import torch
from test_engine import pooled_chi_square_pvalue, tv

from server.alignment import AlignmentSettings
from server.engine.interface import SamplingOptions

PROMPT_TEXT = "Question: what is two plus two?\nAnswer:"
SAMPLES = 2000
SAMPLING = {"temperature": 0.8, "top_k": 40}
# Tokens of the tiny pair at PROMPT_TEXT: the draft's favourite (" Altogether"), which p
# all but excludes (pi has ~0.27 on it through q*), and " It" / "It" (bad word "It").
DRAFT_FAVOURITE = 487
IT_TOKENS = (408, 458)


def _run(engine, prompt, alignment, seed0, max_tokens=2, **sampling):
    return engine.complete_many(
        [prompt] * SAMPLES,
        [SamplingOptions(max_tokens=max_tokens, seed=seed0 + i, ignore_eos=True,
                         **SAMPLING, **sampling) for i in range(SAMPLES)],
        [alignment] * SAMPLES, timeout=1800)


def _forbidding(vocab: int, tokens) -> torch.Tensor:
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[list(tokens)] = False
    return allowed


def _seconds_after_most_common(results) -> tuple[int, Counter, int]:
    firsts = Counter(r.token_ids[0] for r in results)
    token, _ = firsts.most_common(1)[0]
    seconds = Counter(r.token_ids[1] for r in results if r.token_ids[0] == token)
    return token, seconds, sum(seconds.values())


def test_a_soft_logit_bias_applies_to_p_before_mixing(production_engine, reference_factory):
    """logit_bias {p's favourite: -4, another: +3} moves p before mixing: the first token
    (prefill, corrected) and the second (verified drafts) follow the biased pi."""
    prompt = production_engine.engine.tokenizer.encode(PROMPT_TEXT)
    alignment = AlignmentSettings.paper_default("kad_dual")
    plain = reference_factory("kad_dual", alignment.param, **SAMPLING)
    p, _, _ = plain.next_distributions(prompt)
    bias = {int(p.argmax()): -4.0, int(p.topk(3).indices[2]): 3.0}
    biased = reference_factory("kad_dual", alignment.param, logit_bias=bias, **SAMPLING)
    results = _run(production_engine, prompt, alignment, 500_000,
                   logit_bias=tuple(bias.items()))
    _, _, pi = biased.next_distributions(prompt)
    _, _, unbiased = plain.next_distributions(prompt)
    assert 0.5 * float((pi - unbiased).abs().sum()) > 0.1  # the bias matters here
    firsts = Counter(r.token_ids[0] for r in results)
    assert pooled_chi_square_pvalue(firsts, pi, SAMPLES) > 1e-3
    assert pooled_chi_square_pvalue(firsts, unbiased, SAMPLES) < 1e-6
    token, seconds, total = _seconds_after_most_common(results)
    assert total >= 300
    _, _, pi2 = biased.next_distributions(prompt + [token])
    _, _, unbiased2 = plain.next_distributions(prompt + [token])
    assert 0.5 * float((pi2 - unbiased2).abs().sum()) > 0.1
    assert pooled_chi_square_pvalue(seconds, pi2, total) > 1e-3
    assert tv(seconds, pi2, total) < tv(seconds, unbiased2, total)


def test_a_bias_of_minus_100_bans_the_token_from_pi(production_engine, reference_factory):
    """A bias of -100 on the draft's favourite token: p has almost nothing there already,
    so a bias on p alone leaves pi ~0.09 on it (through q*); the ban holds on pi itself,
    at the first and the second token, and the rest of pi is renormalised."""
    prompt = production_engine.engine.tokenizer.encode(PROMPT_TEXT)
    alignment = AlignmentSettings.paper_default("confidence_bet")
    vocab = len(production_engine.engine.tokenizer)
    plain = reference_factory("confidence_bet", alignment.param, **SAMPLING)
    _, _, unbanned = plain.next_distributions(prompt)
    assert float(unbanned[DRAFT_FAVOURITE]) > 0.05  # what a bias on p alone would leave
    banned = reference_factory("confidence_bet", alignment.param,
                               logit_bias={DRAFT_FAVOURITE: -100.0}, **SAMPLING)
    results = _run(production_engine, prompt, alignment, 600_000,
                   logit_bias=((DRAFT_FAVOURITE, -100.0),))
    assert all(DRAFT_FAVOURITE not in r.token_ids for r in results)
    _, _, pi = banned.next_distributions(prompt)
    torch.testing.assert_close(
        pi, plain.next_distributions(prompt, allowed=_forbidding(vocab, [DRAFT_FAVOURITE]))[2])
    firsts = Counter(r.token_ids[0] for r in results)
    assert pooled_chi_square_pvalue(firsts, pi, SAMPLES) > 1e-3
    token, seconds, total = _seconds_after_most_common(results)
    _, _, pi2 = banned.next_distributions(prompt + [token])
    assert pooled_chi_square_pvalue(seconds, pi2, total) > 1e-3


def test_bad_words_are_forbidden_in_pi(production_engine, reference_factory):
    """bad_words ["It"] forbids "It" and " It" (vLLM tokenizes each word with and without a
    leading space) in pi, not only in p: pi without the ban has ~0.27 on them."""
    prompt = production_engine.engine.tokenizer.encode(PROMPT_TEXT)
    alignment = AlignmentSettings.paper_default("kad_dual")
    vocab = len(production_engine.engine.tokenizer)
    reference = reference_factory("kad_dual", alignment.param, **SAMPLING)
    _, _, unbanned = reference.next_distributions(prompt)
    assert float(unbanned[list(IT_TOKENS)].sum()) > 0.1
    results = _run(production_engine, prompt, alignment, 700_000, max_tokens=4,
                   bad_words=("It",))
    assert all(not set(IT_TOKENS) & set(r.token_ids) for r in results)
    allowed = _forbidding(vocab, IT_TOKENS)
    _, _, pi = reference.next_distributions(prompt, allowed=allowed)
    firsts = Counter(r.token_ids[0] for r in results)
    assert pooled_chi_square_pvalue(firsts, pi, SAMPLES) > 1e-3
    token, seconds, total = _seconds_after_most_common(results)
    _, _, pi2 = reference.next_distributions(prompt + [token], allowed=allowed)
    assert pooled_chi_square_pvalue(seconds, pi2, total) > 1e-3


def test_min_tokens_forbids_end_of_text_until_reached(production_engine, reference_factory):
    """End-of-text biased +15 (p puts nearly all its mass there) with min_tokens 2: it is
    forbidden at the first token (corrected at prefill) and the second (verified), and
    allowed from the third, where most requests stop."""
    tokenizer = production_engine.engine.tokenizer
    prompt = tokenizer.encode(PROMPT_TEXT)
    eos = tokenizer.eos_token_id
    alignment = AlignmentSettings.paper_default("kad_dual")
    vocab = len(tokenizer)
    bias = {eos: 15.0}
    results = production_engine.complete_many(
        [prompt] * SAMPLES,
        [SamplingOptions(max_tokens=4, seed=800_000 + i, min_tokens=2,
                         logit_bias=tuple(bias.items()), **SAMPLING)
         for i in range(SAMPLES)],
        [alignment] * SAMPLES, timeout=1800)
    assert all(len(r.token_ids) >= 2 and eos not in r.token_ids[:2] for r in results)
    stopped_at_third = sum(len(r.token_ids) == 3 and r.finish_reason == "stop"
                           for r in results)
    assert stopped_at_third > SAMPLES // 2
    reference = reference_factory("kad_dual", alignment.param, logit_bias=bias, **SAMPLING)
    assert float(reference.next_distributions(prompt)[2][eos]) > 0.5  # what is forbidden
    _, _, pi = reference.next_distributions(prompt, allowed=_forbidding(vocab, [eos]))
    firsts = Counter(r.token_ids[0] for r in results)
    assert pooled_chi_square_pvalue(firsts, pi, SAMPLES) > 1e-3
