"""Every rule against a literal, loop-based transcription of its definition (DESIGN.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kad_kernels import RULES, TWO_MODEL_RULES, deferral, mix, mixture_stats
from kad_kernels.rules import RULE_SPECS

DEFERRAL_RULES = list(TWO_MODEL_RULES)


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


@pytest.mark.parametrize("rule", DEFERRAL_RULES)
def test_full_vocabulary_of_151936(rule):
    """Two rows at the real vocabulary size: the literal loop decides every token, and pi,
    alpha and num_kept match a float64 transcription of the mixture."""
    gen = torch.Generator().manual_seed(1)
    vocab = 151_936
    p = (torch.randn(2, vocab, generator=gen) * 4).softmax(-1)
    q = (torch.randn(2, vocab, generator=gen) * 4).softmax(-1)
    param = RULE_SPECS[rule].default
    d = deferral(p, q, rule, param)
    stats = mixture_stats(p, q, rule, param)
    for row in range(2):
        expected = vector_deferral(p[row].double().numpy(), q[row].double().numpy(), rule, param)
        assert np.array_equal(d[row].numpy(), expected)
        defer = torch.from_numpy(expected)
        p64, q64 = p[row].double() / p[row].double().sum(), q[row].double() / q[row].double().sum()
        alpha = float(p64[defer].sum())
        pi = torch.where(defer, 0.0, p64) + alpha * q64
        torch.testing.assert_close(stats.pi[row].double(), pi, atol=1e-7, rtol=1e-5)
        assert float(stats.alpha[row]) == pytest.approx(alpha, abs=1e-6)
        assert int(stats.num_kept[row]) == int((~defer).sum())
    torch.testing.assert_close(stats.pi.sum(-1), torch.ones(2), atol=1e-5, rtol=0)


def vector_deferral(p: np.ndarray, q: np.ndarray, rule: str, param: float | None) -> np.ndarray:
    """The rules table again, vectorised over the vocabulary in float64 (for V = 151,936)."""
    p, q = p / p.sum(), q / q.sum()
    table = {
        "base": lambda: np.zeros_like(p, dtype=bool),
        "aligned": lambda: np.ones_like(p, dtype=bool),
        "nudging": lambda: np.full(p.shape, p.max() < param),
        "kad_dual": lambda: p < param,
        "kad_squared": lambda: p < 1 - np.sqrt(param),
        "kad_perceptron": lambda: p < p.max() - param,
        "kad_zero_one": lambda: p < p.max(),
        "confidence_bet": lambda: p < q.max() - param,
        "kad_primal": lambda: _primal_by_sort(p, param),
    }
    return table[rule]()


def _primal_by_sort(p: np.ndarray, budget: float) -> np.ndarray:
    """kad_primal by a full sort: k~ = smallest k whose tail outside the top-k is <= budget."""
    values = np.sort(p)[::-1]
    tails = 1.0 - np.concatenate([[0.0], np.cumsum(values)])
    k_tilde = int((tails > budget + 1e-9).sum())
    if k_tilde == 0:
        return np.ones_like(p, dtype=bool)
    return p < values[k_tilde - 1]


# Dyadic probabilities: sums and thresholds are exact in float32, so "at the threshold"
# really is equality and the strict "<" of every rule is what is tested.
EXACT_P = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
EXACT_Q = torch.tensor([0.0625, 0.125, 0.25, 0.5, 0.0625])


@pytest.mark.parametrize(
    ("rule", "param", "deferred"),
    [
        ("kad_dual", 0.25, [False, False, True, True, True]),  # p = lam is kept
        ("kad_dual", 0.5, [False, True, True, True, True]),
        ("kad_squared", 0.25, [False, True, True, True, True]),  # 1 - sqrt(mu) = 0.5
        ("kad_perceptron", 0.25, [False, False, True, True, True]),  # max - mu = 0.25
        ("kad_perceptron", 0.0, [False, True, True, True, True]),
        ("confidence_bet", 0.375, [False, False, False, True, True]),  # max q* - lam = 0.125
        ("nudging", 0.5, [False] * 5),  # max p = lam: not below it, nothing deferred
        ("nudging", 0.625, [True] * 5),
        ("kad_primal", 0.25, [False, False, True, True, True]),  # tail 0.25 <= budget
        ("kad_primal", 0.125, [False, False, False, True, True]),  # tail exactly 0.125
        ("kad_primal", 0.0625, [False, False, False, False, False]),  # tie at the cut kept
        ("kad_primal", 0.5, [False, True, True, True, True]),
    ],
)
def test_threshold_ties_are_kept(rule, param, deferred):
    assert deferral(EXACT_P, EXACT_Q, rule, param).tolist() == deferred
    assert literal_deferral(EXACT_P.tolist(), EXACT_Q.tolist(), rule, param) == deferred
    pi, alpha = literal_mix(EXACT_P.tolist(), EXACT_Q.tolist(), rule, param)
    stats = mixture_stats(EXACT_P, EXACT_Q, rule, param)
    torch.testing.assert_close(stats.pi, torch.tensor(pi))
    assert float(stats.alpha) == alpha


@pytest.mark.parametrize("rule", [r for r in DEFERRAL_RULES if RULE_SPECS[r].param])
def test_per_request_parameters_in_one_batch(rule):
    """A [B] parameter tensor (as [B, 1] against [B, G, V]): every request its own value."""
    gen = torch.Generator().manual_seed(2)
    p = (torch.randn(4, 3, 32, generator=gen) * 3).softmax(-1)
    q = (torch.randn(4, 3, 32, generator=gen) * 3).softmax(-1)
    values = [0.0, 0.2, 0.5, 1.0]
    stats = mixture_stats(p, q, rule, torch.tensor(values).view(4, 1))
    for i, value in enumerate(values):
        alone = mixture_stats(p[i], q[i], rule, value)
        torch.testing.assert_close(stats.pi[i], alone.pi)
        torch.testing.assert_close(stats.alpha[i], alone.alpha)
        assert stats.num_kept[i].tolist() == alone.num_kept.tolist()
    # Different values really give different mixtures (the test would notice a mix-up).
    assert not torch.allclose(stats.pi[0], stats.pi[3])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rule", RULES)
def test_low_precision_input_gives_float32_output(dtype, rule):
    gen = torch.Generator().manual_seed(3)
    p, q, q_base = ((torch.randn(5, 64, generator=gen) * 2).softmax(-1) for _ in range(3))
    param = RULE_SPECS[rule].default
    extra = {"q_base": q_base} if rule == "implicit_reward" else {}
    low = {"q_base": q_base.to(dtype)} if extra else {}
    pi_low = mix(p.to(dtype), q.to(dtype), rule, param, **low)
    assert pi_low.dtype == torch.float32
    torch.testing.assert_close(pi_low.sum(-1), torch.ones(5), atol=1e-5, rtol=0)
    # Same rule on the float32 image of the rounded input: identical up to float32 rounding.
    exact = mix(p.to(dtype).float(), q.to(dtype).float(), rule, param,
                **({"q_base": q_base.to(dtype).float()} if extra else {}))
    torch.testing.assert_close(pi_low, exact)
    # And close to the float32 input's mixture on rows where rounding flipped no decision.
    same = torch.ones(5, dtype=torch.bool)
    if rule != "implicit_reward":
        same = (deferral(p.to(dtype), q.to(dtype), rule, param) == deferral(p, q, rule, param))
        same = same.all(-1)
    assert int(same.sum()) >= 3
    error = (pi_low - mix(p, q, rule, param, **extra)).abs().amax(-1)
    assert float(error[same].max()) < 2e-2


def test_implicit_reward_reweights_p_by_the_likelihood_ratio():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q_star = torch.tensor([0.1, 0.6, 0.3, 0.0])
    q_base = torch.tensor([0.4, 0.2, 0.4, 0.0])
    weights = p * q_star / q_base.clamp_min(1e-30)
    torch.testing.assert_close(mix(p, q_star, "implicit_reward", q_base=q_base),
                               weights / weights.sum())


def test_kad_primal_every_search_tier_matches_a_full_sort():
    """One batch whose rows need a nucleus of a few, a few hundred and thousands of tokens,
    so each tier of the top-value search (and the full sort) decides some row."""
    from kad_kernels.rules import _PRIMAL_TOPK_TIERS

    vocab, budget = 151_936, 0.9
    gen = torch.Generator().manual_seed(11)
    scales = torch.tensor([6.0, 3.0, 2.0, 1.7, 1.0, 0.0]).unsqueeze(-1)
    p = (torch.randn(len(scales), vocab, generator=gen) * scales).softmax(-1)
    d = deferral(p, p, "kad_primal", budget)
    kept = []
    for row in range(len(scales)):
        expected = _primal_by_sort(p[row].double().numpy(), budget)
        assert d[row].numpy().tolist() == expected.tolist(), row
        kept.append(int((~expected).sum()))
    small, large = _PRIMAL_TOPK_TIERS
    assert any(k <= small for k in kept)
    assert any(small < k <= large for k in kept)
    assert any(k > large for k in kept), kept
