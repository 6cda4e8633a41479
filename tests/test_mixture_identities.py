"""The KAD paper's identities between rules, checked on many random distributions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from kad_kernels import deferral, mix, mixture_stats

GEN = torch.Generator().manual_seed(7)


def _random_rows(rows: int, vocab: int, sharpness: float) -> torch.Tensor:
    return (torch.randn(rows, vocab, generator=GEN) * sharpness).softmax(-1)


def test_nudging_equals_kad_dual_when_max_p_below_lambda():
    p = _random_rows(500, 32, 0.5)
    q = _random_rows(500, 32, 2.0)
    lam = float(p.max(-1).values.max()) + 1e-3  # every row has max p < lam
    torch.testing.assert_close(mix(p, q, "nudging", lam), mix(p, q, "kad_dual", lam))
    torch.testing.assert_close(mix(p, q, "nudging", lam), q)  # everything deferred


def test_single_token_above_lambda_and_lemma_6_bound():
    """With exactly one token at or above lam, nudging keeps p whole while kad_dual keeps
    that token's mass and defers every other one; Lemma 6 bounds the acceptance loss:
    TV(pi, q*) <= TV(phi, q*) + alpha (1 - beta), beta = sum d q*."""
    p = _random_rows(500, 32, 4.0)
    q = _random_rows(500, 32, 2.0)
    lam = 0.3
    rows = (p >= lam).sum(-1) == 1
    assert int(rows.sum()) > 50
    p, q = p[rows], q[rows]
    torch.testing.assert_close(mix(p, q, "nudging", lam), p)
    d = deferral(p, q, "kad_dual", lam)
    assert bool((d.sum(-1) == p.shape[-1] - 1).all())
    pi = mix(p, q, "kad_dual", lam)
    alpha = (p * d).sum(-1)
    beta = (q * d).sum(-1)
    tv_pi = 0.5 * (pi - q).abs().sum(-1)
    tv_phi = 0.5 * (p - q).abs().sum(-1)
    assert bool((tv_pi <= tv_phi + alpha * (1 - beta) + 1e-6).all())


def test_kad_zero_one_keeps_only_the_argmax_mass():
    p = _random_rows(200, 16, 3.0)
    q = _random_rows(200, 16, 3.0)
    pi = mix(p, q, "kad_zero_one")
    top = p.argmax(-1, keepdim=True)
    p_top = p.gather(-1, top)
    expected = q * (1 - p_top)
    expected.scatter_add_(-1, top, p_top)
    torch.testing.assert_close(pi, expected)


def _primal_by_loss(p: list[float], budget: float, loss) -> list[bool]:
    """Section 3.3 literally: sort by increasing loss, critical index k~ with
    sum_{v > k~} p_v <= b < sum_{v >= k~} p_v, then d_v = [loss(v) > loss(k~)]."""
    order = sorted(range(len(p)), key=lambda v: loss(p[v]))
    total = sum(p)
    for k in range(len(p) + 1):
        if sum(p[v] for v in order[k:]) <= budget * total + 1e-9:
            break
    if k == 0:
        return [True] * len(p)
    mu = loss(p[order[k - 1]])
    return [loss(x) > mu for x in p]


ORDER_INVERTING_LOSSES = {
    "logistic": lambda x: -math.log(x) if x > 0 else math.inf,
    "squared": lambda x: (1 - x) ** 2,
    "perceptron": lambda x: 1 - x,
    "min_entropy": lambda x: -math.log(x + 1e-300),
    "zero_one_smooth": lambda x: 1 / (1 + x),
}


def test_kad_primal_is_the_same_rule_for_every_order_inverting_loss():
    for _ in range(50):
        p = _random_rows(1, 12, 2.0)[0]
        for budget in (0.05, 0.3, 0.6, 0.9):
            kernel = deferral(p, p, "kad_primal", budget).tolist()
            for name, loss in ORDER_INVERTING_LOSSES.items():
                assert _primal_by_loss(p.tolist(), budget, loss) == kernel, (name, budget)


def _all_deferral_vectors(vocab: int) -> np.ndarray:
    """Every d in {0,1}^V as the rows of a [2^V, V] matrix (the knapsack's search space)."""
    return np.array(list(itertools.product([0.0, 1.0], repeat=vocab)))


def test_kad_primal_is_the_lagrangian_dual_optimum_by_brute_force():
    """Section 3.3 from scratch, with the plug-in P = p: over all 2^V deferral vectors,
    the dual function L(mu) = min_d r(d) + mu (sum_v p_v d_v - b) is maximised at
    mu^ = loss of the critical token, and d+ = [loss > mu^] is the kernel's kad_primal for
    every order-inverting loss. d+ is feasible (deferred mass <= b) and brackets the exact
    knapsack optimum: L(mu^) <= r(d^) <= r(d+)."""
    vocab = 7
    all_d = _all_deferral_vectors(vocab)
    rng = np.random.default_rng(11)
    checked = 0
    for _ in range(12):
        p = rng.dirichlet(np.full(vocab, 0.7))
        p_t = torch.tensor(p, dtype=torch.float32)
        p = p_t.double().numpy() / p_t.double().sum().item()  # exactly what the kernel sees
        for budget in (0.1, 0.35, 0.6, 0.85):
            kernel = deferral(p_t, p_t, "kad_primal", budget).numpy()
            for name, loss in ORDER_INVERTING_LOSSES.items():
                ell = np.array([loss(x) for x in p])
                risk = (1 - all_d) @ (p * ell)  # r(d) for every d
                mass = all_d @ p  # deferred mass for every d
                candidates = np.unique(ell)  # L is concave, piecewise linear, kinks at losses
                dual = np.array([np.min(risk + mu * (mass - budget)) for mu in candidates])
                mu_hat = candidates[np.argmax(dual)]
                d_plus = ell > mu_hat
                assert np.array_equal(d_plus, kernel), (name, budget, p)
                feasible = mass <= budget + 1e-12
                knapsack = np.min(risk[feasible])  # r(d^), the exact optimum
                r_plus = float(np.sum(p * ell * ~d_plus))
                assert float(p[d_plus].sum()) <= budget + 1e-12
                assert dual.max() <= knapsack + 1e-12 <= r_plus + 2e-12
                checked += 1
    assert checked == 12 * 4 * len(ORDER_INVERTING_LOSSES)


def test_base_is_p_and_aligned_is_q_star():
    p = _random_rows(10, 16, 2.0)
    q = _random_rows(10, 16, 2.0)
    torch.testing.assert_close(mix(p, q, "base"), p)
    torch.testing.assert_close(mix(p, q, "aligned"), q)
    stats = mixture_stats(p, q, "aligned")
    torch.testing.assert_close(stats.alpha, torch.ones(10))
    torch.testing.assert_close(stats.acceptance, torch.ones(10))
