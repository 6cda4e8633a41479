"""speculative_verify emits tokens distributed exactly as sampling from pi.

For fixed p, q* and every rule, 40,000 batched trials: the first emitted token and the
2-token prefix must match pi (chi-square). Three deliberately wrong verifiers (no
residual, bonus from p, accepting with p/q*) must fail the same check, so it has teeth.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from kad_kernels import RULES, mix, speculative_verify
from kad_kernels.rules import RULE_SPECS
from kad_kernels.sampling import sample_rows

TRIALS = 40_000
VOCAB = 8
GAMMA = 2
P_VALUE = 1e-4


def _setup(seed: int = 0, gamma: int = GAMMA):
    """Per-position p, q*, q for gamma + 2 positions (a step, and the next one)."""
    gen = torch.Generator().manual_seed(seed)
    p = (torch.randn(gamma + 2, VOCAB, generator=gen) * 3.0).softmax(-1)
    q_star = (torch.randn(gamma + 2, VOCAB, generator=gen) * 1.5).softmax(-1)
    q_base = (torch.randn(gamma + 2, VOCAB, generator=gen) * 1.5).softmax(-1)
    return p, q_star, q_base


def _pi(rule: str, p, q_star, q_base):
    spec = RULE_SPECS[rule]
    param = spec.default if spec.param else None
    return mix(p, q_star, rule, param, q_base=q_base if rule == "implicit_reward" else None)


def _draft(q_star: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Drafts for every trial, one column per row of ``q_star``. The test's distributions
    depend on the position only, so the draft at position i is drawn from q*_i."""
    cols = [sample_rows(q_star[i].expand(TRIALS, VOCAB), gen) for i in range(q_star.shape[0])]
    return torch.stack(cols, dim=1)


def _chi2_pvalue(observed: np.ndarray, expected_probs: np.ndarray) -> float:
    expected = expected_probs * observed.sum()
    keep = expected > 0
    if (observed[~keep] > 0).any():
        return 0.0
    exp = expected[keep] * observed.sum() / expected[keep].sum()
    return float(scipy_stats.chisquare(observed[keep], exp).pvalue)


def correct_verify(pi, q_star, drafts, gen):
    n = drafts.shape[0]
    return speculative_verify(pi.expand(n, -1, -1), q_star.expand(n, -1, -1), drafts, gen)


def _two_tokens(verify, pi, q_star, gen, gamma=GAMMA):
    """First two generated tokens: one verification step, and a second step (starting at
    position 1) for the trials whose first step emitted a single token."""
    tokens, num = verify(pi[: gamma + 1], q_star[:gamma], _draft(q_star[:gamma], gen), gen)
    assert bool((num >= 1).all())
    second = tokens[:, 1].clone()
    need = num == 1
    later, _ = verify(pi[1: gamma + 2], q_star[1: gamma + 1], _draft(q_star[1: gamma + 1], gen), gen)
    second[need] = later[need, 0]
    return tokens[:, 0], second


def _pvalues(first, second, pi) -> tuple[float, float]:
    """p-values of the first token vs pi_0 and of the 2-token prefix vs pi_0 x pi_1."""
    p_first = _chi2_pvalue(np.bincount(first.numpy(), minlength=VOCAB), pi[0].double().numpy())
    joint = np.bincount((first * VOCAB + second).numpy(), minlength=VOCAB * VOCAB)
    expected = torch.outer(pi[0], pi[1]).double().flatten().numpy()
    return p_first, _chi2_pvalue(joint, expected)


@pytest.mark.parametrize("gamma", [2, 3])
@pytest.mark.parametrize("rule", RULES)
def test_emitted_tokens_follow_pi(rule, gamma):
    p, q_star, q_base = _setup(gamma=gamma)
    pi = _pi(rule, p, q_star, q_base)
    gen = torch.Generator().manual_seed(1)
    p_first, p_pair = _pvalues(*_two_tokens(correct_verify, pi, q_star, gen, gamma), pi)
    assert p_first > P_VALUE and p_pair > P_VALUE, (rule, p_first, p_pair)
    tokens, num = correct_verify(pi[: gamma + 1], q_star[:gamma], _draft(q_star[:gamma], gen), gen)
    positions = torch.arange(gamma + 1)
    assert torch.equal(tokens >= 0, positions < num.unsqueeze(-1))  # -1 padding after num
    assert bool(((num >= 1) & (num <= gamma + 1)).all())
    # Accepted drafts are emitted unchanged: every emitted token before the last is a draft.
    drafts_again = _draft(q_star[:gamma], torch.Generator().manual_seed(9))
    tokens, num = correct_verify(pi[: gamma + 1], q_star[:gamma], drafts_again, gen)
    for i in range(gamma):
        kept = num > i + 1
        assert torch.equal(tokens[kept, i], drafts_again[kept, i])


# --- wrong verifiers that the check must reject -------------------------------------------
def wrong_verify(accept_with=None, residual=True, bonus_from=None):
    """A sequential verifier with one deliberate bug switched on."""

    def verify(pi, q_star, drafts, gen):
        gamma = drafts.shape[1]
        n = drafts.shape[0]
        accept_target = pi if accept_with is None else accept_with
        out = torch.full((n, gamma + 1), -1, dtype=torch.long)
        num = torch.zeros(n, dtype=torch.long)
        alive = torch.ones(n, dtype=torch.bool)
        for i in range(gamma):
            x = drafts[:, i]
            accept = alive & (torch.rand(n, generator=gen) < accept_target[i, x] / q_star[i, x])
            reject = alive & ~accept
            dist = (pi[i] - q_star[i]).clamp_min(0) if residual else pi[i]
            dist = dist if float(dist.sum()) > 0 else pi[i]
            fix = sample_rows(dist.expand(n, VOCAB), gen)
            out[accept, i] = x[accept]
            out[reject, i] = fix[reject]
            num += (accept | reject).long()
            alive = accept
        bonus_dist = pi[gamma] if bonus_from is None else bonus_from[gamma]
        bonus = sample_rows(bonus_dist.expand(n, VOCAB), gen)
        out[alive, gamma] = bonus[alive]
        num += alive.long()
        return out, num

    return verify


def test_the_check_rejects_wrong_verifiers():
    p, q_star, q_base = _setup()
    pi = _pi("kad_dual", p, q_star, q_base)
    assert float((pi - q_star).abs().sum(-1).min()) > 0.2  # pi keeps some of p everywhere
    gen = torch.Generator().manual_seed(2)
    assert min(_pvalues(*_two_tokens(wrong_verify(), pi, q_star, gen), pi)) > P_VALUE
    no_residual = _pvalues(*_two_tokens(wrong_verify(residual=False), pi, q_star, gen), pi)
    p_ratio = _pvalues(*_two_tokens(wrong_verify(accept_with=p), pi, q_star, gen), pi)
    assert min(no_residual) < P_VALUE
    assert min(p_ratio) < P_VALUE


def test_the_check_rejects_a_bonus_drawn_from_p():
    """With gamma 1 and pi = q* every draft is accepted: the second token is the bonus."""
    p, q_star, q_base = _setup(3)
    pi = _pi("aligned", p, q_star, q_base)
    gen = torch.Generator().manual_seed(4)
    good = _pvalues(*_two_tokens(correct_verify, pi, q_star, gen, gamma=1), pi)
    bad = _pvalues(*_two_tokens(wrong_verify(bonus_from=p), pi, q_star, gen, gamma=1), pi)
    assert min(good) > P_VALUE
    assert bad[1] < P_VALUE


def test_without_bonus_position_no_bonus_is_emitted():
    p, q_star, _ = _setup()
    pi = mix(p, q_star, "aligned")[:GAMMA]  # pi = q*: all accepted, and no bonus row given
    drafts = torch.tensor([[1, 2]] * 4)
    tokens, num = speculative_verify(pi.expand(4, -1, -1), q_star[:GAMMA].expand(4, -1, -1), drafts)
    assert num.tolist() == [2, 2, 2, 2]
    assert tokens[:, 2].tolist() == [-1] * 4
    assert tokens[:, :2].tolist() == [[1, 2]] * 4


def test_zero_mass_residual_samples_from_pi(monkeypatch):
    """pi == q* exactly, and every draft is forced to be rejected (acceptance uniforms of 1,
    which torch.rand never returns): the residual max(0, pi - q*) is all zeros, so the
    correction must come from pi itself, with pi's distribution (a zero residual row
    drawn as it is would always give token 0, which has no mass here)."""
    pi = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4])
    trials = 20_000
    real_rand = torch.rand
    calls = []

    def rand_with_uniform_one_first(*args, **kwargs):
        out = real_rand(*args, **kwargs)
        calls.append(out.shape)
        return torch.ones_like(out) if len(calls) == 1 else out

    monkeypatch.setattr(torch, "rand", rand_with_uniform_one_first)
    gen = torch.Generator().manual_seed(0)
    drafts = torch.full((trials, 1), 3)
    tokens, num = speculative_verify(
        pi.expand(trials, 1, -1), pi.expand(trials, 1, -1), drafts, generator=gen
    )
    assert calls[0] == (trials, 1)  # the acceptance uniforms were the forced ones
    assert bool((num == 1).all())
    counts = np.bincount(tokens[:, 0].numpy(), minlength=5)
    assert counts[0] == 0
    assert _chi2_pvalue(counts, pi.double().numpy()) > P_VALUE


def test_rounding_level_residual_does_not_crash():
    """pi == q* up to float rounding: whatever the verdict, the token has mass in pi."""
    q_star = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    pi = torch.tensor([[0.5 - 3e-8, 0.5 + 6e-8, 0.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    drafts = torch.zeros(5000, 1, dtype=torch.long)
    tokens, num = speculative_verify(
        pi.expand(5000, -1, -1), q_star.expand(5000, -1, -1), drafts, generator=gen
    )
    assert bool((num == 1).all())
    assert set(tokens[:, 0].tolist()) <= {0, 1}


def test_greedy_accepts_iff_draft_is_argmax_of_pi():
    pi = torch.tensor([[[0.1, 0.6, 0.3], [0.7, 0.2, 0.1], [0.2, 0.2, 0.6]]])
    q_star = torch.tensor([[[0.3, 0.3, 0.4], [0.3, 0.4, 0.3]]])
    tokens, num = speculative_verify(pi, q_star, torch.tensor([[1, 0]]), greedy=True)
    assert tokens.tolist() == [[1, 0, 2]] and num.tolist() == [3]
    tokens, num = speculative_verify(pi, q_star, torch.tensor([[2, 0]]), greedy=True)
    assert tokens.tolist() == [[1, -1, -1]] and num.tolist() == [1]


def test_greedy_rows_chosen_per_request():
    """A [B] greedy mask: greedy rows follow argmax pi, the others sample as usual."""
    pi = torch.tensor([[[0.1, 0.6, 0.3], [0.7, 0.2, 0.1], [0.2, 0.2, 0.6]]]).expand(2, -1, -1)
    q_star = pi[:, :2]  # pi == q*: a sampling row accepts every draft
    drafts = torch.tensor([[2, 2], [2, 2]])
    tokens, num = speculative_verify(pi, q_star, drafts, greedy=torch.tensor([True, False]),
                                     generator=torch.Generator().manual_seed(0))
    assert tokens[0].tolist() == [1, -1, -1] and num[0] == 1
    assert tokens[1, :2].tolist() == [2, 2] and num[1] == 3


def test_sample_rows_two_level_path_is_exact():
    """Rows longer than 4 blocks are drawn block first, then inside the block: the draws
    still follow the row (unnormalised, mass at block edges and in the ragged last block)
    and never land on a zero-probability token."""
    vocab, trials = 6000, 20_000  # 5 blocks of 1024 and a ragged block of 880
    support = torch.tensor([0, 5, 1023, 1024, 2047, 3000, 4095, 4096, 5119, 5120, 5121,
                            5500, 5998, 5999])
    gen = torch.Generator().manual_seed(12)
    weights = torch.rand(len(support), generator=gen) + 0.05
    row = torch.zeros(vocab).index_put_((support,), weights * 3.7)
    draws = sample_rows(row.expand(trials, vocab), gen)
    assert bool(torch.isin(draws, support).all())
    counts = torch.bincount(draws, minlength=vocab)[support].numpy()
    expected = (weights / weights.sum()).double().numpy()
    assert _chi2_pvalue(counts, expected) > P_VALUE
    # The same check rejects a draw that is off by one block (teeth).
    shifted = torch.bincount(draws, minlength=vocab)[support.roll(1)].numpy()
    assert _chi2_pvalue(shifted, expected) < P_VALUE


def test_sample_rows_matches_on_both_paths_for_a_single_token():
    for vocab in (10, 100_000):
        row = torch.zeros(3, vocab)
        row[0, vocab - 1] = 1e-30  # the only mass is tiny and at the very end
        row[1, 0] = 5.0
        row[2, vocab // 2] = 1.0
        assert sample_rows(row).tolist() == [vocab - 1, 0, vocab // 2]
