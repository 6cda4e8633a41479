"""Every rule against a literal, loop-based transcription of its definition (DESIGN.md)."""

from __future__ import annotations

import math

import pytest
import torch

from kad_kernels import RULES, deferral, mix, mixture_stats
from kad_kernels.rules import RULE_SPECS

DEFERRAL_RULES = [rule for rule in RULES if rule != "implicit_reward"]


def literal_deferral(p: list[float], q: list[float], rule: str, param: float | None) -> list[bool]:
    """Plain-Python transcription of the rules table, one token at a time (rows are
    normalised first: the kernels accept rows whose float sum is not exactly 1)."""
    p_total, q_total = sum(p), sum(q)
    p = [x / p_total for x in p]
    q = [x / q_total for x in q]
    vocab = range(len(p))
    max_p, max_q = max(p), max(q)
    if rule == "base":
        return [False for _ in vocab]
    if rule == "aligned":
        return [True for _ in vocab]
    if rule == "nudging":
        return [max_p < param for _ in vocab]
    if rule == "kad_dual":
        return [p[v] < param for v in vocab]
    if rule == "kad_squared":
        return [p[v] < 1 - math.sqrt(param) for v in vocab]
    if rule == "kad_perceptron":
        return [p[v] < max_p - param for v in vocab]
    if rule == "kad_zero_one":
        return [p[v] < max_p for v in vocab]
    if rule == "confidence_bet":
        return [p[v] < max_q - param for v in vocab]
    if rule == "kad_primal":
        order = sorted(vocab, key=lambda v: -p[v])
        total = sum(p)
        k_tilde = next(
            k for k in range(len(p) + 1)
            if total - sum(p[v] for v in order[:k]) <= param * total + 1e-6
        )
        if k_tilde == 0:
            return [True for _ in vocab]
        critical = p[order[k_tilde - 1]]
        return [p[v] < critical for v in vocab]  # ties with the critical token are kept
    raise AssertionError(rule)


def literal_mix(p, q, rule, param):
    d = literal_deferral(p, q, rule, param)
    alpha = sum(p[v] for v in range(len(p)) if d[v])
    return [p[v] * (not d[v]) + q[v] * alpha for v in range(len(p))], alpha


def _cases() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    vocab = 16
    cases = []
    for i in range(6):
        logits = torch.randn(vocab, generator=gen) * (0.5 + i)
        q_logits = torch.randn(vocab, generator=gen) * 2
        cases.append((f"random{i}", logits.softmax(-1), q_logits.softmax(-1)))
    peaked = torch.full((vocab,), 0.01)
    peaked[3] = 1 - 0.01 * (vocab - 1)
    flat = torch.full((vocab,), 1.0 / vocab)
    ties = torch.tensor([0.3, 0.3, 0.1, 0.1, 0.1, 0.1] + [0.0] * (vocab - 6))
    q = torch.linspace(1, 2, vocab).softmax(-1)
    cases += [("peaked", peaked, q), ("flat", flat, q), ("ties", ties, q), ("ties_q", q, ties)]
    return cases


CASES = _cases()
# Away from the cases' exact probabilities: a threshold equal to a probability is a float tie.
PARAMS = [0.0, 0.05, 0.15, 0.25, 0.35, 0.45, 0.65, 0.95, 1.0]


@pytest.mark.parametrize("rule", DEFERRAL_RULES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rule_matches_its_literal_definition(rule, case):
    _, p, q = case
    params = [None] if RULE_SPECS[rule].param is None else PARAMS
    for param in params:
        d = deferral(p, q, rule, param)
        expected_d = literal_deferral(p.tolist(), q.tolist(), rule, param)
        assert d.tolist() == expected_d, (rule, param)
        pi_expected, alpha = literal_mix(p.tolist(), q.tolist(), rule, param)
        stats = mixture_stats(p, q, rule, param)
        torch.testing.assert_close(stats.pi, torch.tensor(pi_expected), atol=1e-6, rtol=1e-5)
        assert float(stats.pi.sum()) == pytest.approx(1.0, abs=1e-5)
        assert float(stats.alpha) == pytest.approx(alpha, abs=1e-6)
        assert int(stats.num_kept) == expected_d.count(False)
        assert float(stats.acceptance) == pytest.approx(
            sum(min(a, b) for a, b in zip(pi_expected, q.tolist())), abs=1e-5
        )


def test_ties_and_edge_cases():
    ties = torch.tensor([0.3, 0.3, 0.2, 0.2])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert deferral(ties, q, "kad_zero_one").tolist() == [False, False, True, True]
    # kad_primal: budget 0.5 -> the top-2 leave 0.4 outside, so k~ = 2.
    assert deferral(ties, q, "kad_primal", 0.5).tolist() == [False, False, True, True]
    # budget 0.3 -> k~ = 3; the 4th token ties with the critical 3rd and is kept too.
    assert deferral(ties, q, "kad_primal", 0.3).tolist() == [False, False, False, False]
    # All deferred: pi = q*; nothing deferred: pi = p.
    torch.testing.assert_close(mix(ties, q, "kad_dual", 1.0), q)
    torch.testing.assert_close(mix(ties, q, "kad_dual", 0.0), ties)
    torch.testing.assert_close(mix(ties, q, "kad_primal", 1.0), q)
    torch.testing.assert_close(mix(ties, q, "kad_primal", 0.0), ties)


@pytest.mark.parametrize("rule", ["kad_dual", "kad_primal", "confidence_bet", "nudging"])
def test_full_vocabulary_of_151936(rule):
    gen = torch.Generator().manual_seed(1)
    vocab = 151_936
    p = (torch.randn(2, vocab, generator=gen) * 4).softmax(-1)
    q = (torch.randn(2, vocab, generator=gen) * 4).softmax(-1)
    param = RULE_SPECS[rule].default
    d = deferral(p, q, rule, param)
    for row in range(2):
        expected = literal_deferral(p[row].tolist(), q[row].tolist(), rule, param) \
            if rule != "kad_primal" else _primal_by_sort(p[row], param)
        assert d[row].tolist() == expected
    pi = mix(p, q, rule, param)
    torch.testing.assert_close(pi.sum(-1), torch.ones(2), atol=1e-4, rtol=0)


def _primal_by_sort(p: torch.Tensor, budget: float) -> list[bool]:
    """kad_primal by a full sort in float64 (the literal loop is too slow at this size)."""
    values, _ = p.double().sort(descending=True)
    tails = p.double().sum() - torch.cat([torch.zeros(1, dtype=torch.float64), values.cumsum(0)])
    k_tilde = int((tails > budget).sum())
    if k_tilde == 0:
        return [True] * p.numel()
    return (p.double() < values[k_tilde - 1]).tolist()


def test_per_request_parameters_in_one_batch():
    gen = torch.Generator().manual_seed(2)
    p = (torch.randn(4, 3, 32, generator=gen) * 3).softmax(-1)
    q = (torch.randn(4, 3, 32, generator=gen) * 3).softmax(-1)
    lams = torch.tensor([0.0, 0.2, 0.5, 1.0])
    pi = mix(p, q, "kad_dual", lams.view(4, 1))
    for i, lam in enumerate(lams.tolist()):
        torch.testing.assert_close(pi[i], mix(p[i], q[i], "kad_dual", lam))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_gives_float32_output(dtype):
    gen = torch.Generator().manual_seed(3)
    p = (torch.randn(5, 64, generator=gen) * 2).softmax(-1)
    q = (torch.randn(5, 64, generator=gen) * 2).softmax(-1)
    pi_low = mix(p.to(dtype), q.to(dtype), "kad_dual", 0.1)
    assert pi_low.dtype == torch.float32
    torch.testing.assert_close(pi_low.sum(-1), torch.ones(5), atol=1e-5, rtol=0)
    pi = mix(p, q, "kad_dual", 0.1)
    assert float((pi_low - pi).abs().max()) < 2e-2


def test_implicit_reward_reweights_p_by_the_likelihood_ratio():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q_star = torch.tensor([0.1, 0.6, 0.3, 0.0])
    q_base = torch.tensor([0.4, 0.2, 0.4, 0.0])
    weights = p * q_star / q_base.clamp_min(1e-30)
    torch.testing.assert_close(mix(p, q_star, "implicit_reward", q_base=q_base),
                               weights / weights.sum())
