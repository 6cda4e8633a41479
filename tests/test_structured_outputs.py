"""Structured outputs under pi, at the shipped gamma 5: vLLM's xgrammar backend builds the
mask, the hook applies it to pi after mixing, and vLLM's exact rejection sampler samples
the masked pi (drafts stay unconstrained; a draft the grammar rejects is verified and
rejected, not cut).

The reference is the reference decoder's pi masked with the same grammar's mask, computed
here with xgrammar itself for the tokens generated so far.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from test_engine import pooled_chi_square_pvalue, tv

from server.alignment import AlignmentSettings
from server.engine.interface import SamplingOptions, StructuredOutput

PROMPT_TEXT = "Question: what is two plus two?\nAnswer:"
SAMPLES = 2000
# Temperature 0.7 with top-k: the setting for the exactness tests.
SAMPLING = {"temperature": 0.7, "top_k": 40}
CHOICE = StructuredOutput("choice", ["yes", "no", "maybe", "never", "cat", "dog"])
REGEX = StructuredOutput("regex", r"(a|b|c|d|e|y|n|m)[a-z]{1,5}")


class GrammarMask:
    """The tokens a constraint allows after some generated tokens, from xgrammar as vLLM's
    backend builds it (``XgrammarBackend``: the served tokenizer, the target's vocabulary)."""

    def __init__(self, tokenizer, vocab_size: int, structured: StructuredOutput) -> None:
        import xgrammar as xgr
        from vllm.v1.structured_output.utils import choice_as_grammar

        self.xgr = xgr
        self.vocab_size = vocab_size
        compiler = xgr.GrammarCompiler(
            xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size))
        if structured.kind == "regex":
            self.compiled = compiler.compile_regex(structured.value)
        elif structured.kind == "choice":
            self.compiled = compiler.compile_grammar(choice_as_grammar(structured.value))
        else:
            raise ValueError(structured.kind)

    def allowed_after(self, tokens: list[int]) -> torch.Tensor:
        matcher = self.xgr.GrammarMatcher(self.compiled)
        for token in tokens:
            assert matcher.accept_token(token), (tokens, token)
        bitmask = self.xgr.allocate_token_bitmask(1, self.vocab_size)
        matcher.fill_next_token_bitmask(bitmask)
        logits = torch.zeros(1, self.vocab_size)
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)
        return torch.isfinite(logits[0])


@pytest.fixture(scope="module")
def prompt(production_engine):
    return production_engine.engine.tokenizer.encode(PROMPT_TEXT)


def _mask(engine, reference, structured) -> GrammarMask:
    vocab = reference.target.model.config.vocab_size
    return GrammarMask(engine.engine.tokenizer, vocab, structured)


@pytest.mark.parametrize("rule", ["kad_dual", "confidence_bet"])
@pytest.mark.parametrize("structured", [CHOICE, REGEX], ids=["choice", "regex"])
def test_first_token_under_a_constraint_is_the_masked_pi(production_engine, reference_factory,
                                                         prompt, rule, structured):
    alignment = AlignmentSettings.paper_default(rule)
    reference = reference_factory(rule, alignment.param, **SAMPLING)
    allowed = _mask(production_engine, reference, structured).allowed_after([])
    assert 2 < int(allowed.sum()) < len(allowed) // 2  # a real constraint, several choices
    p, _, pi = reference.next_distributions(prompt, allowed=allowed)
    results = production_engine.complete_many(
        [prompt] * SAMPLES,
        [SamplingOptions(max_tokens=1, seed=500_000 + i, structured=structured, **SAMPLING)
         for i in range(SAMPLES)],
        [alignment] * SAMPLES, timeout=1800)
    counts = Counter(r.token_ids[0] for r in results)
    assert all(allowed[t] for t in counts), "a token the grammar forbids was generated"
    assert pooled_chi_square_pvalue(counts, pi, SAMPLES) > 1e-3, tv(counts, pi, SAMPLES)
    # Teeth: the masked target alone (vLLM's own constrained sampling) is another law.
    if 0.5 * float((pi - p).abs().sum()) > 0.15:
        assert pooled_chi_square_pvalue(counts, p, SAMPLES) < 1e-6


def test_a_verified_position_under_a_regex_is_the_masked_pi(production_engine,
                                                            reference_factory, prompt):
    """The second token, after the most frequent first one, is verified against drafts the
    unconstrained draft model proposed (many of them invalid under the regex, kept and
    rejected rather than cut): it follows the masked pi given the first token."""
    rule = "kad_dual"
    alignment = AlignmentSettings.paper_default(rule)
    reference = reference_factory(rule, alignment.param, **SAMPLING)
    mask = _mask(production_engine, reference, REGEX)
    results = production_engine.complete_many(
        [prompt] * SAMPLES,
        [SamplingOptions(max_tokens=2, seed=600_000 + i, structured=REGEX, **SAMPLING)
         for i in range(SAMPLES)],
        [alignment] * SAMPLES, timeout=1800)
    firsts = Counter(r.token_ids[0] for r in results)
    token, _ = firsts.most_common(1)[0]
    seconds = Counter(r.token_ids[1] for r in results
                      if r.token_ids[0] == token and len(r.token_ids) > 1)
    total = sum(seconds.values())
    assert total >= 300
    allowed = mask.allowed_after([token])
    _, _, pi = reference.next_distributions(prompt + [token], allowed=allowed)
    assert all(allowed[t] for t in seconds)
    assert pooled_chi_square_pvalue(seconds, pi, total) > 1e-3, tv(seconds, pi, total)
    stats = [r.stats for r in results]
    assert sum(s.drafted for s in stats) > 0 and sum(s.inexact for s in stats) == 0


@pytest.mark.parametrize("structured", [CHOICE, REGEX], ids=["choice", "regex"])
def test_greedy_follows_the_argmax_of_the_masked_pi_and_the_text_matches(
        production_engine, reference_factory, prompt, structured):
    rule = "confidence_bet"
    alignment = AlignmentSettings.paper_default(rule)
    reference = reference_factory(rule, alignment.param, temperature=0.0)
    mask = _mask(production_engine, reference, structured)
    got = production_engine.complete_many(
        [prompt], [SamplingOptions(max_tokens=12, temperature=0.0, structured=structured)],
        [alignment], timeout=300)[0]
    expected: list[int] = []
    eos = reference.target.model.config.eos_token_id
    while len(expected) < len(got.token_ids):
        allowed = mask.allowed_after(expected)
        _, _, pi = reference.next_distributions(prompt + expected, allowed=allowed)
        expected.append(int(pi.argmax()))
        if expected[-1] == eos or not bool(allowed.any()):
            break
    assert got.token_ids == expected
    assert got.finish_reason == "stop"
    if structured.kind == "choice":
        assert got.text in structured.value
    else:
        assert re.fullmatch(structured.value, got.text), got.text


def test_every_sampled_text_follows_its_constraint(production_engine, prompt):
    """200 sampled answers under each constraint, mixed rules: every one that ends on its
    own (not at max_tokens) is one of the choices or matches the regex in full."""
    rules = ["kad_dual", "confidence_bet", "kad_primal", "aligned"]
    for structured in (CHOICE, REGEX):
        results = production_engine.complete_many(
            [prompt] * 200,
            [SamplingOptions(max_tokens=16, seed=700_000 + i, structured=structured)
             for i in range(200)],
            [AlignmentSettings.paper_default(rules[i % 4]) for i in range(200)],
            timeout=900)
        finished = [r for r in results if r.finish_reason == "stop"]
        assert len(finished) >= 190
        for r in finished:
            if structured.kind == "choice":
                assert r.text in structured.value, r.text
            else:
                assert re.fullmatch(structured.value, r.text), r.text
