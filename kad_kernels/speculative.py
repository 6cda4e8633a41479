"""Exact speculative verification with the mixture ``pi`` as target and ``q*`` as proposal.

q* drafts x_1..x_G; x_i is accepted with probability ``min(1, pi_i(x_i) / q*_i(x_i))``; at
the first rejection a token is drawn from ``norm(max(0, pi_i - q*_i))`` and the step ends;
when every draft is accepted a bonus token is drawn from ``pi_{G+1}`` only if it was given.
This makes the emitted tokens distributed exactly as autoregressive sampling from ``pi``.
Everything is batched: no Python loop over requests or positions.
"""

from __future__ import annotations

import torch

from kad_kernels.sampling import sample_rows
from kad_kernels.validation import as_probs

# Residual mass below this is rounding: pi == q* at that position, so draw from pi instead.
_ZERO_RESIDUAL = 1e-7


def _check_shapes(pi: torch.Tensor, q_star: torch.Tensor, draft_tokens: torch.Tensor) -> bool:
    if draft_tokens.dim() != 2 or draft_tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"draft_tokens must be an integer tensor [B, G], got {draft_tokens.dtype} "
            f"{tuple(draft_tokens.shape)}"
        )
    batch, gamma = draft_tokens.shape
    if q_star.dim() != 3 or q_star.shape[0] != batch or q_star.shape[1] not in (gamma, gamma + 1):
        raise ValueError(
            f"q_star must have shape [B, G, V] or [B, G+1, V] with B={batch}, G={gamma}, "
            f"got {tuple(q_star.shape)}"
        )
    vocab = q_star.shape[-1]
    if pi.dim() != 3 or pi.shape[0] != batch or pi.shape[-1] != vocab or pi.shape[1] not in (gamma, gamma + 1):
        raise ValueError(
            f"pi must have shape [B, G+1, V] or [B, G, V] with B={batch}, G={gamma}, V={vocab}, "
            f"got {tuple(pi.shape)}"
        )
    if gamma > 0 and (bool((draft_tokens < 0).any()) or bool((draft_tokens >= vocab).any())):
        raise ValueError(f"draft_tokens must lie in [0, {vocab})")
    return pi.shape[1] == gamma + 1


def speculative_verify(
    pi: torch.Tensor,
    q_star: torch.Tensor,
    draft_tokens: torch.Tensor,
    generator: torch.Generator | None = None,
    greedy: bool | torch.Tensor = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify drafts against ``pi``; return ``(tokens [B, G+1] padded with -1, num_emitted [B])``.

    ``q_star`` may carry the drafter's distribution at the bonus position too (``[B, G+1, V]``,
    the tensor ``mix`` was given): it is not used. ``greedy`` (a bool or a bool tensor ``[B]``) selects
    temperature-0 rows: a draft is accepted iff it equals the argmax of ``pi`` and the
    emitted correction is that argmax.
    """
    has_bonus = _check_shapes(pi, q_star, draft_tokens)
    pi, pi_sum = as_probs(pi, "pi")
    q_star, q_sum = as_probs(q_star, "q_star")
    batch, gamma = draft_tokens.shape
    q_star, q_sum = q_star[:, :gamma], q_sum[:, :gamma]
    device = pi.device
    draft = draft_tokens.long()
    greedy_rows = torch.as_tensor(greedy, dtype=torch.bool, device=device).expand(batch)
    any_greedy = bool(greedy_rows.any())
    arange_b = torch.arange(batch, device=device)

    # Accept/reject every draft position at once; the first rejection ends the step.
    # Only the gathered entries are normalised: no pass over the whole vocabulary.
    pi_draft = pi[:, :gamma].gather(-1, draft.unsqueeze(-1)).squeeze(-1) / pi_sum[:, :gamma, 0]
    q_draft = q_star.gather(-1, draft.unsqueeze(-1)).squeeze(-1) / q_sum[..., 0]
    uniform = torch.rand(batch, gamma, device=device, generator=generator)
    accepted = uniform * q_draft < pi_draft  # u < min(1, pi/q*), without dividing by 0
    argmax_pi = pi.argmax(dim=-1) if any_greedy else None  # [B, G or G+1]
    if any_greedy:
        accepted = torch.where(greedy_rows.unsqueeze(-1), draft == argmax_pi[:, :gamma], accepted)
    rejected = ~accepted
    any_rejected = rejected.any(dim=-1)
    num_accepted = torch.where(any_rejected, rejected.to(torch.uint8).argmax(dim=-1), gamma)

    # One emitted token per row: residual at the first rejection, else the bonus from pi.
    emits = any_rejected | has_bonus
    pos = num_accepted.clamp(max=pi.shape[1] - 1)
    pi_row = pi[arange_b, pos]  # unnormalised: sample_rows needs no normalisation
    pi_row_sum = pi_sum[arange_b, pos]
    if gamma:
        # pi_sum * residual = max(0, pi_row - pi_sum * q*/q_sum) at rejected rows and
        # pi_row itself at the others: q* enters with weight 1 or 0, in one row buffer.
        q_pos = num_accepted.clamp(max=gamma - 1)
        weight = any_rejected.unsqueeze(-1) * pi_row_sum / q_sum[arange_b, q_pos]
        dist = q_star[arange_b, q_pos].mul_(-weight).add_(pi_row).clamp_(min=0.0)
        # Residual mass below rounding (pi == q*): draw from pi instead.
        flat = dist.sum(dim=-1, keepdim=True) <= _ZERO_RESIDUAL * pi_row_sum
        if bool(flat.any()):
            rows = flat.squeeze(-1)
            dist[rows] = pi_row[rows]
    else:
        dist = pi_row
    emitted = sample_rows(dist, generator)
    if any_greedy:
        emitted = torch.where(greedy_rows, argmax_pi[arange_b, pos], emitted)

    positions = torch.arange(gamma + 1, device=device)
    tokens = torch.full((batch, gamma + 1), -1, dtype=torch.long, device=device)
    tokens[:, :gamma] = torch.where(positions[:gamma] < num_accepted.unsqueeze(-1), draft, -1)
    tokens[arange_b[emits], num_accepted[emits]] = emitted[emits]
    return tokens, num_accepted + emits.long()
