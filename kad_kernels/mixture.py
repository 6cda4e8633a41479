"""The mixture ``pi = p (1 - d) + alpha q*`` and its per-row statistics.

All math is float32 whatever the input dtype; inputs need not be exactly normalised
(every quantity is taken relative to the row sums), outputs are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kad_kernels.rules import (
    RULE_SPECS,
    check_two_model_rule,
    deferral_from_probs,
    resolve_param,
    row_threshold,
)
from kad_kernels.validation import as_probs, check_same_shape


@dataclass(frozen=True)
class MixtureStats:
    """Per-row results of one mixture: shapes ``[...]`` (leading dims), ``pi`` is ``[..., V]``.

    ``alpha`` is the deferred mass of ``p`` (NaN for ``implicit_reward``, which defers
    nothing in the knapsack sense); ``num_kept`` counts tokens whose ``p`` mass is kept;
    ``acceptance`` is ``1 - TV(pi, q*)``, the speculative acceptance probability of a draft
    sampled from ``q*`` at this position.
    """

    pi: torch.Tensor
    alpha: torch.Tensor
    num_kept: torch.Tensor
    acceptance: torch.Tensor


def _prepare(p, q_star, rule, param, q_base):
    p, p_sum = as_probs(p, "p")
    q_star, q_sum = as_probs(q_star, "q_star")
    check_same_shape(p, q_star, "p", "q_star")
    param_t = resolve_param(rule, param, p.shape[:-1], p.device)
    if RULE_SPECS[rule].needs_q_base:
        if q_base is None:
            raise ValueError(f"rule {rule!r} needs q_base, the small base model's probabilities")
        q_base, _ = as_probs(q_base, "q_base")
        check_same_shape(p, q_base, "p", "q_base")
    return p, p_sum, q_star, q_sum, param_t, q_base


def _implicit_reward(p: torch.Tensor, q_star: torch.Tensor, q_base: torch.Tensor) -> torch.Tensor:
    """``pi ∝ p q*/q``; tokens with ``q == 0`` get no mass; rows with no overlap (or an
    overflowing ratio) fall back to p."""
    weights = torch.where(q_base > 0, p * q_star / q_base, 0.0)
    total = weights.sum(dim=-1, keepdim=True)
    ok = torch.isfinite(total) & (total > 0)
    return torch.where(ok, weights / total, p / p.sum(dim=-1, keepdim=True))


def _mix_prepared(p, p_sum, q_star, q_sum, rule, param_t, q_base):
    """Return ``(pi, t, alpha)`` on validated inputs, ``t`` the row threshold (``d = p < t``);
    ``t``/``alpha`` are None for implicit_reward."""
    if rule == "implicit_reward":
        return _implicit_reward(p, q_star, q_base), None, None
    threshold = row_threshold(p, q_star, rule, param_t, p_sum, q_sum)
    if rule in ("base", "aligned"):  # nothing / everything deferred: no mixing pass
        source, total = (p, p_sum) if rule == "base" else (q_star, q_sum)
        alpha = torch.zeros_like(p_sum) if rule == "base" else torch.ones_like(p_sum)
        return source / total, threshold, alpha
    pi, alpha = _threshold_mix(p, p_sum, q_star, q_sum, threshold)
    return pi, threshold, alpha


def _threshold_mix(p, p_sum, q_star, q_sum, threshold):
    """``pi = p [p >= t] / p_sum + alpha q* / q_sum`` with ``alpha = sum(p [p < t]) / p_sum``.

    Five passes over the vocabulary (compare, select, sum, scale, add q*), in one output
    buffer. ``alpha = (p_sum - kept_sum) / p_sum``: when nothing is deferred ``kept`` is
    ``p`` bit for bit and its sum is the same reduction as ``p_sum``, so ``alpha`` is exactly
    0 (and exactly 1 when everything is deferred); in between the difference carries the
    rounding of one float32 sum.
    """
    kept = torch.where(p >= threshold, p, 0.0)
    alpha = ((p_sum - kept.sum(dim=-1, keepdim=True)) / p_sum).clamp_(0.0, 1.0)
    pi = kept.div_(p_sum)
    pi.addcmul_(q_star, alpha / q_sum)
    return pi, alpha


def mix(
    p: torch.Tensor,
    q_star: torch.Tensor,
    rule: str,
    param: float | torch.Tensor | None = None,
    q_base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Target distribution ``pi`` of ``rule`` for base ``p`` and aligned ``q_star``, ``[..., V]``.

    ``param`` is a float or a tensor broadcastable to the leading dims (one value per
    request). Raises ValueError for an unknown rule, a missing/out-of-range parameter,
    mismatched shapes, or NaN/negative/infinite input.
    """
    p, p_sum, q_star, q_sum, param_t, q_base = _prepare(p, q_star, rule, param, q_base)
    pi, _, _ = _mix_prepared(p, p_sum, q_star, q_sum, rule, param_t, q_base)
    return pi


def mix_with_alpha(
    p: torch.Tensor,
    q_star: torch.Tensor,
    rule: str,
    param: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pi, alpha)``: the mixture and the deferred mass per row ``[...]``, without the
    extra vocabulary passes of ``mixture_stats`` (what the serving hook needs)."""
    check_two_model_rule(rule, "deferred mass")
    p, p_sum, q_star, q_sum, param_t, _ = _prepare(p, q_star, rule, param, None)
    pi, _, alpha = _mix_prepared(p, p_sum, q_star, q_sum, rule, param_t, None)
    return pi, alpha.squeeze(-1)


def mix_trusted(
    p: torch.Tensor,
    p_sum: torch.Tensor,
    q_star: torch.Tensor,
    q_sum: torch.Tensor,
    rule: str,
    param: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pi [..., V], alpha [..., 1])`` for inputs the caller vouches for: float32
    unnormalised ``p``/``q_star`` with their row sums ``[..., 1]`` and ``param`` float32
    ``[..., 1]`` (or None). No validation and no host sync: the serving hook's path, which
    handles non-finite rows itself (row-wise math keeps a bad row from touching others).
    """
    check_two_model_rule(rule, "deferred mass")
    pi, _, alpha = _mix_prepared(p, p_sum, q_star, q_sum, rule, param, None)
    return pi, alpha


def deferral(
    p: torch.Tensor,
    q_star: torch.Tensor,
    rule: str,
    param: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean deferral vector ``d`` (True = token's ``p`` mass goes to ``q*``), ``[..., V]``."""
    check_two_model_rule(rule, "deferral vector")
    p, p_sum, q_star, q_sum, param_t, _ = _prepare(p, q_star, rule, param, None)
    return deferral_from_probs(p, q_star, rule, param_t, p_sum, q_sum)


def acceptance_probability(pi: torch.Tensor, q_star: torch.Tensor) -> torch.Tensor:
    """``1 - TV(pi, q*) = sum_v min(pi_v, q*_v)`` per row (both normalised first)."""
    pi, pi_sum = as_probs(pi, "pi")
    q_star, q_sum = as_probs(q_star, "q_star")
    check_same_shape(pi, q_star, "pi", "q_star")
    return torch.minimum(pi / pi_sum, q_star / q_sum).sum(dim=-1)


def mixture_stats(
    p: torch.Tensor,
    q_star: torch.Tensor,
    rule: str,
    param: float | torch.Tensor | None = None,
    q_base: torch.Tensor | None = None,
) -> MixtureStats:
    """``pi`` together with deferred mass, kept-token count and acceptance probability per row."""
    p, p_sum, q_star, q_sum, param_t, q_base = _prepare(p, q_star, rule, param, q_base)
    pi, threshold, alpha = _mix_prepared(p, p_sum, q_star, q_sum, rule, param_t, q_base)
    lead = pi.shape[:-1]
    if threshold is None:
        alpha_out = torch.full(lead, float("nan"), device=pi.device)
        kept = torch.full(lead, pi.shape[-1], dtype=torch.long, device=pi.device)
    else:
        alpha_out = alpha.squeeze(-1)
        kept = (p >= threshold).sum(dim=-1)
    acceptance = torch.minimum(pi, q_star / q_sum).sum(dim=-1)
    return MixtureStats(pi=pi, alpha=alpha_out, num_kept=kept, acceptance=acceptance)
