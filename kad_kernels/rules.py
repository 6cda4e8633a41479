"""Deferral rules of DESIGN.md: which tokens of the base model's ``p`` are deferred to ``q*``.

Every rule maps ``(p, q*)`` to a boolean vector ``d`` over the vocabulary; the mixture is
``pi = p * (1 - d) + alpha * q*`` with ``alpha = sum(p * d)``. Rules are pure tensor code
batched over any leading dimensions, so one call serves every request and draft position.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from kad_kernels.validation import check_number, check_param, check_rule


@dataclass(frozen=True)
class RuleSpec:
    """A rule's one scalar parameter (its name, the paper's default and its valid range) and
    whether it needs ``q_base``, a third model (the aligned model's base version q)."""

    name: str
    param: str | None = None
    default: float | None = None
    low: float = 0.0
    high: float = 1.0
    needs_q_base: bool = False


RULE_SPECS: dict[str, RuleSpec] = {
    spec.name: spec
    for spec in (
        RuleSpec("base"),
        RuleSpec("aligned"),
        RuleSpec("nudging", "lam", 0.4),
        RuleSpec("kad_dual", "lam", 0.4),
        # mu = 0.36 puts the squared-loss threshold 1 - sqrt(mu) at the dual's 0.4.
        RuleSpec("kad_squared", "mu", 0.36),
        RuleSpec("kad_perceptron", "mu", 0.05),
        RuleSpec("kad_zero_one"),
        RuleSpec("kad_primal", "budget", 0.9),
        RuleSpec("confidence_bet", "lam", 0.2),
        RuleSpec("implicit_reward", needs_q_base=True),
    )
}

RULES: tuple[str, ...] = tuple(RULE_SPECS)
# Rules of (p, q*) alone, with a deferral vector: what the two-model engine and the
# reference decoder serve.
TWO_MODEL_RULES: tuple[str, ...] = tuple(r for r, spec in RULE_SPECS.items() if not spec.needs_q_base)
# Parameter names over all rules (the fields of the API's ``kad`` object).
PARAM_NAMES: tuple[str, ...] = tuple(dict.fromkeys(s.param for s in RULE_SPECS.values() if s.param))


def unserved_reason(rule: str) -> str | None:
    """Why a two-model server cannot serve the known ``rule`` (None when it can)."""
    if RULE_SPECS[rule].needs_q_base:
        return (f"rule {rule!r} needs a third model (the aligned model's base version q) "
                "that this server does not load")
    return None


def check_two_model_rule(rule: str, what: str) -> None:
    """ValueError if ``rule`` needs ``q_base`` (it has no deferral vector / deferred mass)."""
    if rule in RULE_SPECS and RULE_SPECS[rule].needs_q_base:
        raise ValueError(f"rule {rule!r} has no {what} (it reweights p by q*/q)")


# Rows whose nucleus fits in this many top tokens skip the full vocabulary sort (kad_primal):
# the first tier settles almost every row of a real model at little cost, the second the
# flatter rows; only what is left pays a sort (``kad-bench kernels`` times it against the
# plain sort: about 20x faster on peaked rows, at most the cost of the tiers on flat ones).
_PRIMAL_TOPK_TIERS = (16, 256)
# Relative tolerance on tail masses (kad_primal): below float32 resolution of a row sum.
_TAIL_TOLERANCE = 1e-6


def _row_max(x: torch.Tensor) -> torch.Tensor:
    return x.amax(dim=-1, keepdim=True)


def _primal_threshold(p: torch.Tensor, budget: torch.Tensor, p_sum: torch.Tensor,
                      tiers: tuple[int, ...] = _PRIMAL_TOPK_TIERS) -> torch.Tensor:
    """Row threshold deferring every token outside the top-k~ of ``p`` (ties with the k~-th
    token kept): the k~-th largest value, or +inf when k~ = 0.

    k~ is the smallest k whose tail mass (mass outside the top-k) is at most the budget,
    i.e. the kept set is the nucleus of mass ``1 - budget``. Most rows need only a few top
    tokens, so the top values decide them and only the remaining rows pay a full sort
    (``tiers=()``: the plain full sort for every row, what ``kad-bench kernels`` compares).
    """
    vocab = p.shape[-1]
    flat = p.reshape(-1, vocab)
    allowed_tail = (budget * p_sum).to(torch.float64).reshape(-1, 1)
    total = p_sum.to(torch.float64).reshape(-1, 1)
    threshold = torch.full_like(total, float("nan"), dtype=flat.dtype)
    rows = torch.arange(flat.shape[0], device=flat.device)
    for k in (*tiers, vocab):
        k = min(k, vocab)
        candidates = flat if rows.numel() == flat.shape[0] else flat[rows]
        top = (candidates.topk(k, dim=-1).values if k < vocab
               else candidates.sort(dim=-1, descending=True).values)
        found = _critical_value(top, total[rows], allowed_tail[rows])
        threshold[rows] = found
        unresolved = torch.isnan(found).squeeze(-1)
        if k == vocab or not bool(unresolved.any()):
            break
        rows = rows[unresolved]
    return threshold.reshape(*p.shape[:-1], 1)


def _critical_value(
    top_desc: torch.Tensor, total: torch.Tensor, allowed_tail: torch.Tensor
) -> torch.Tensor:
    """Value of the critical (k~-th) token per row; +inf defers all; NaN if outside ``top_desc``."""
    cum = top_desc.to(torch.float64).cumsum(dim=-1)
    tails = torch.cat([total, total - cum], dim=-1)  # tail mass outside the top-k, k = 0..K
    # Smallest k with tail <= budget; float32 inputs leave rounding residue in the tails.
    k_crit = (tails > allowed_tail + _TAIL_TOLERANCE * total).sum(dim=-1)
    width = top_desc.shape[-1]
    index = (k_crit - 1).clamp(0, width - 1).unsqueeze(-1)
    value = top_desc.gather(-1, index).squeeze(-1).clone()
    value[k_crit == 0] = float("inf")
    value[k_crit > width] = float("nan")
    return value.unsqueeze(-1)


def row_threshold(
    p: torch.Tensor,
    q_star: torch.Tensor,
    rule: str,
    param: torch.Tensor | None,
    p_sum: torch.Tensor,
    q_sum: torch.Tensor,
) -> torch.Tensor:
    """Every rule is a per-row threshold ``t`` ``[..., 1]`` on raw ``p``: ``d_v = p_v < t``.

    ``t = 0`` defers nothing (p >= 0), ``t = +inf`` defers everything. Thresholds on the
    normalised ``p / p_sum`` are scaled by ``p_sum`` instead of normalising the vocabulary.
    Inputs are validated float32, ``param`` shaped ``[..., 1]``.
    """
    lead = p.shape[:-1] + (1,)
    if rule == "base":
        return torch.zeros(lead, device=p.device)
    if rule == "aligned":
        return torch.full(lead, float("inf"), device=p.device)
    if rule == "nudging":  # Chow's rule: the whole row or nothing
        return torch.where(_row_max(p) < param * p_sum, float("inf"), 0.0)
    if rule == "kad_dual":
        return param * p_sum
    if rule == "kad_squared":
        return (1.0 - param.sqrt()) * p_sum
    if rule == "kad_perceptron":
        return _row_max(p) - param * p_sum
    if rule == "kad_zero_one":
        return _row_max(p)
    if rule == "kad_primal":
        return _primal_threshold(p, param, p_sum)
    if rule == "confidence_bet":
        return (_row_max(q_star) / q_sum - param) * p_sum
    raise ValueError(f"rule {rule!r} has no deferral vector (it is not a deferral rule)")


def deferral_from_probs(
    p: torch.Tensor,
    q_star: torch.Tensor,
    rule: str,
    param: torch.Tensor | None,
    p_sum: torch.Tensor,
    q_sum: torch.Tensor,
) -> torch.Tensor:
    """Boolean deferral mask ``[..., V]`` on validated float32 inputs."""
    return p < row_threshold(p, q_star, rule, param, p_sum, q_sum)


def check_rule_param(rule: str, param: object) -> RuleSpec:
    """Check that ``rule`` is known and ``param`` is given exactly when the rule takes one."""
    spec = RULE_SPECS[check_rule(rule, RULES)]
    if spec.param is None and param is not None:
        raise ValueError(f"rule {rule!r} takes no parameter, got {param!r}")
    if spec.param is not None and param is None:
        raise ValueError(f"rule {rule!r} needs its parameter {spec.param!r}")
    return spec


def resolve_param(rule: str, param: float | torch.Tensor | None, lead_shape: torch.Size,
                  device: torch.device) -> torch.Tensor | None:
    """Check ``rule``/``param`` and return the parameter as float32 ``[..., 1]`` (or None)."""
    spec = check_rule_param(rule, param)
    if spec.param is None:
        return None
    return check_param(param, spec.param, spec.low, spec.high, lead_shape, device)


def check_named_param(rule: str, given: Mapping[str, float]) -> float | None:
    """Check ``rule`` with its parameter given by name (``{"lam": 0.4}``, the API's form);
    return the parameter's value (None for a parameterless rule)."""
    spec = RULE_SPECS[check_rule(rule, RULES)]
    foreign = sorted(set(given) - {spec.param})
    if foreign:
        takes = f"takes {spec.param!r}" if spec.param else "takes no parameter"
        raise ValueError(f"rule {rule!r} {takes}, got {', '.join(map(repr, foreign))}")
    value = given.get(spec.param) if spec.param else None
    check_rule_param(rule, value)
    if value is not None:
        check_number(value, spec.param, spec.low, spec.high)
    return value
