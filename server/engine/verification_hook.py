"""The mixture inside vLLM's verification step, as plain tensor code (no vLLM import).

vLLM verifies the draft model's tokens against the target distribution with an exact
rejection sampler. Handing it ``log(pi)`` instead of the target logits makes that sampler
sample from the mixture ``pi = mix(p, q*)``; ``vllm_patches`` calls the functions here from
the patched vLLM internals. Three places where vLLM would otherwise emit a token of ``p``
are corrected after sampling (see ``finalize_step``):

* the first output token (sampled by the plain sampler at prefill, with no ``q*`` yet):
  the engine withholds the prompt's last token and this module forces it as the first
  "sampled" token, so every real output token goes through verification;
* the bonus token after all drafts are accepted (drawn from ``p``): dropped for every rule
  but ``base`` (costs at most one token per step; the draft has no ``q*`` there);
* greedy rows: verification targets the one-hot argmax of ``pi`` (vLLM itself only knows
  the argmax of ``p``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from kad_kernels import mix_with_alpha

logger = logging.getLogger(__name__)

PLACEHOLDER = -1  # vLLM's PLACEHOLDER_TOKEN_ID: "no token at this position"
EXTRA_ARGS_KEY = "kad"
_DEFERRED = 1e-6  # a position "deferred something" above float rounding of alpha


@dataclass(frozen=True)
class RowAlignment:
    """One batch row's settings, read from ``SamplingParams.extra_args['kad']``."""

    request_id: str
    rule: str
    param: float | None = None
    greedy: bool = False  # temperature 0 requested: follow argmax(pi), sent as temperature 1
    first_token: int | None = None  # the withheld last prompt token, forced as output 0

    @classmethod
    def from_extra_args(cls, extra_args: dict[str, Any] | None) -> RowAlignment | None:
        settings = (extra_args or {}).get(EXTRA_ARGS_KEY)
        if not settings:
            return None
        return cls(
            request_id=str(settings["id"]),
            rule=str(settings["rule"]),
            param=settings.get("param"),
            greedy=bool(settings.get("greedy", False)),
            first_token=settings.get("first_token"),
        )

    @property
    def mixes(self) -> bool:
        """Whether verification must use ``pi`` (``base`` is vLLM's own target ``p``)."""
        return self.rule != "base"


@dataclass
class StepState:
    """What the verification of one engine step leaves for ``finalize_step``."""

    rows: list[RowAlignment | None]
    num_draft_tokens: list[int] = field(default_factory=list)
    alpha: torch.Tensor | None = None  # [num_tokens] deferred mass at each draft position
    inexact_rows: set[int] = field(default_factory=set)  # mixing rows verified without q*
    # Rows whose drafts are vLLM's placeholders (-1, always rejected; no q* exists): the
    # token sampled there comes from the target p, then is replaced by the withheld prompt
    # token (``first_token``) or counted as inexact.
    placeholder_rows: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class RowStepStats:
    """One request's share of one engine step (summed into ``RequestStats`` upstream)."""

    request_id: str
    drafted: int
    accepted: int
    emitted: int
    positions: int
    alpha_sum: float
    deferred_positions: int
    inexact: int = 0


def mix_target_logits(
    target_logits: torch.Tensor,
    draft_probs: torch.Tensor | None,
    num_draft_tokens: list[int],
    state: StepState,
) -> torch.Tensor:
    """Return target logits whose softmax is ``pi`` on every mixing row's draft positions.

    ``target_logits`` ``[num_tokens, V]`` hold vLLM's target after temperature/top-k/top-p
    (rows of the draft positions of all requests, request-major), ``draft_probs`` the
    draft's ``q*`` at the same positions. Non-mixing rows are returned unchanged.
    """
    num_tokens = target_logits.shape[0]
    device = target_logits.device
    state.alpha = torch.zeros(num_tokens, dtype=torch.float32, device=device)
    # Which request each token row belongs to (request-major layout).
    owners = [i for i, n in enumerate(num_draft_tokens) for _ in range(n)]
    mixing = [i for i, row in enumerate(state.rows) if row is not None and row.mixes]
    if not mixing or num_tokens == 0:
        return target_logits
    if draft_probs is None:
        # Only when vLLM drafted greedily for an all-greedy batch; the engine never sends
        # mixing requests with temperature 0, so this is a guard, counted and logged.
        state.inexact_rows.update(i for i in mixing if num_draft_tokens[i] > 0)
        logger.warning("verification without draft probabilities: pi cannot be formed")
        return target_logits

    by_rule: dict[str, list[int]] = {}
    for token_index, owner in enumerate(owners):
        row = state.rows[owner]
        if row is None or not row.mixes:
            continue
        if owner in state.placeholder_rows:
            state.inexact_rows.add(owner)
        else:
            by_rule.setdefault(row.rule, []).append(token_index)
    if not by_rule:
        return target_logits
    out = target_logits.clone()
    for rule, token_indices in by_rule.items():
        index = torch.tensor(token_indices, device=device, dtype=torch.long)
        params = [state.rows[owners[t]].param for t in token_indices]
        param = None if params[0] is None else torch.tensor(params, device=device)
        p = torch.softmax(target_logits.index_select(0, index).float(), dim=-1)
        q_star = draft_probs.index_select(0, index).float()
        pi, alpha = mix_with_alpha(p, q_star, rule, param)
        greedy = torch.tensor(
            [state.rows[owners[t]].greedy for t in token_indices], device=device
        )
        if bool(greedy.any()):
            one_hot = torch.zeros_like(pi).scatter_(-1, pi.argmax(-1, keepdim=True), 1.0)
            pi = torch.where(greedy.unsqueeze(-1), one_hot, pi)
        out.index_copy_(0, index, torch.log(pi).to(out.dtype))
        state.alpha.index_copy_(0, index, alpha)
    return out


def finalize_step(
    sampled: torch.Tensor,
    logits: torch.Tensor,
    bonus_logits_rows: torch.Tensor | None,
    first_step: list[bool],
    state: StepState,
) -> list[RowStepStats]:
    """Correct vLLM's sampled tokens in place and return the step's per-request stats.

    ``sampled`` is ``[num_reqs, 1 + max_spec_len]`` (placeholder -1 for no token);
    ``logits`` the target logits the step sampled from, ``bonus_logits_rows[i]`` the row of
    ``logits`` holding request i's bonus/plain position (``None``: row i itself, the plain
    sampler's layout). ``first_step[i]``: this step samples request i's first output token.
    """
    num_reqs = len(state.rows)
    drafts = state.num_draft_tokens or [0] * num_reqs
    valid_before = (sampled[:num_reqs] != PLACEHOLDER).sum(dim=-1).tolist()
    offsets = [0]
    for n in drafts:
        offsets.append(offsets[-1] + n)
    alpha = state.alpha.tolist() if state.alpha is not None else []
    results: list[RowStepStats] = []
    for i, row in enumerate(state.rows):
        if row is None:
            continue
        n_draft = drafts[i] if i < len(drafts) else 0
        if first_step[i] and row.first_token is not None:
            # Prefill of prompt[:-1]: emit the withheld last prompt token; not generated.
            sampled[i, 0] = row.first_token
            continue
        n_valid = int(valid_before[i])
        if n_valid == 0:
            continue  # a partial prefill chunk or a discarded row: nothing was sampled
        accepted = n_valid - 1  # vLLM always appends one recovered or bonus token
        emitted = n_valid
        all_accepted = n_draft > 0 and accepted == n_draft
        if n_draft == 0 or all_accepted:
            # The last token came from p at the bonus position (or the plain sampler).
            if row.mixes and n_draft > 0:
                sampled[i, n_draft] = PLACEHOLDER
                emitted -= 1
            elif row.greedy:
                source = i if bonus_logits_rows is None else int(bonus_logits_rows[i])
                sampled[i, n_draft] = int(logits[source].argmax())
        inexact = int(i in state.inexact_rows or (n_draft == 0 and row.mixes))
        positions = min(n_draft, accepted + 1)
        row_alpha = alpha[offsets[i]: offsets[i] + positions]
        results.append(RowStepStats(
            request_id=row.request_id,
            drafted=n_draft,
            accepted=accepted,
            emitted=emitted,
            positions=positions,
            alpha_sum=float(sum(row_alpha)),
            deferred_positions=sum(1 for a in row_alpha if a > _DEFERRED),
            inexact=inexact,
        ))
    return results
