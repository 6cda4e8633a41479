"""Tokens sampled where no proposal has seen the context yet, corrected to pi in the step.

pi needs the draft's q* at a position, and the draft computes it only once it has read
the token before. At a request's first output (its prefill) no proposal has read the
prompt's last token; after the hook changed a row's token, the drafts made after the old
token are void and the next step has no q* either. Such a row (``StepPlan.corrected``) is
sampled from the processed p in ``_sample`` as vLLM would, and vLLM's drafter then runs its
first forward of the step over the row's tokens anyway (to fill its KV cache and draft
after the sampled token): its hidden state at the sampled position gives q* there. Before
vLLM's bookkeeping reads the step's tokens, ``correct`` keeps each token with
probability ``min(1, pi/p)`` or replaces it by a sample of ``(pi - p)+`` (exact for pi),
and writes logprobs of pi. A replaced token voids the drafts made after it: the proposal
then runs again from the corrected tokens (one more drafter pass, in the steps where a
token changed), so the scheduler only ever receives drafts that follow the real tokens.

So no prompt token is withheld: vLLM sees the whole prompt, its grammar, penalties and
counters see only generated tokens. No vLLM import here; ``vllm_patches`` wires it in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from server.engine.step_plan import RowAlignment
from server.engine.verification_hook import (
    correct_to_pi,
    gather_logprobs,
    log_pi_of,
    processed_pi,
    to_device,
)

_SAMPLING_EPS = 1e-5  # vLLM's: a temperature below it is greedy (its q* is taken at 1)


@dataclass(frozen=True)
class PendingCorrection:
    """This step's rows sampled from p, waiting for the drafter's q* (set in ``_sample``,
    applied in the proposal that follows).

    ``rows[j]`` is a batch row, ``request_ids[j]`` its request, ``after[j]`` how many of
    the row's target tokens this step follow the one whose output was sampled (0 at a
    prefill; the scheduled drafts of a padded row); ``target_probs[j]`` the processed p
    the token was drawn from, ``tokens[j]`` that token; ``raw_logits`` the target's raw
    logits of the rows that report logprobs under pi (``logprob_rows`` index ``rows``);
    ``forbidden`` the tokens a grammar forbids at each row (None: no constraint);
    ``output`` vLLM's ``SamplerOutput`` of the step (its tokens and logprobs are
    corrected in place); ``width`` its tokens' row width.
    """

    rows: tuple[int, ...]
    request_ids: tuple[str, ...]
    after: tuple[int, ...]
    alignments: tuple[RowAlignment, ...]
    target_probs: torch.Tensor
    tokens: torch.Tensor
    generators: dict[int, torch.Generator]
    temperature: torch.Tensor | None
    logprob_rows: tuple[int, ...]
    raw_logits: torch.Tensor | None
    forbidden: torch.Tensor | None  # [n, V] tokens a grammar forbids at each row
    num_logprobs: int | None
    output: Any
    width: int

    @property
    def points(self) -> dict[int, int]:
        """What the drafter's hidden-state capture keeps: batch row -> ``after``."""
        return dict(zip(self.rows, self.after))


@dataclass(frozen=True)
class Correction:
    """What ``correct`` did: the final tokens, the requests whose token it changed (their
    drafts are void) and those with a non-finite p or q* (their token stays p's)."""

    tokens: torch.Tensor
    changed: tuple[str, ...]
    degraded: tuple[str, ...]


def correct(pending: PendingCorrection, draft_hidden: torch.Tensor,
            draft_logits_of: Callable[[torch.Tensor], torch.Tensor]) -> Correction:
    """Correct the pending rows' tokens to samples of pi from the drafter's hidden states
    ``[n, H]`` at their sampled positions, writing tokens and logprobs into vLLM's output."""
    device = pending.target_probs.device
    n = len(pending.rows)
    owners = np.arange(n)
    logits = draft_logits_of(draft_hidden).float().to(device)[:, :pending.target_probs.shape[1]]
    # q* as the drafter samples it (``DraftPass.sample``): float32 logits / T (1 if greedy).
    temperature = torch.ones(n, device=device) if pending.temperature is None else \
        pending.temperature.float().to(device)
    temperature = torch.where(temperature < _SAMPLING_EPS, 1.0, temperature)
    q_star = (logits / temperature.unsqueeze(-1)).softmax(dim=-1)
    pi, bad = processed_pi(pending.target_probs, q_star, pending.alignments, owners,
                           pending.forbidden)
    greedy = torch.tensor([a.greedy for a in pending.alignments], device=device)
    tokens = correct_to_pi(pending.target_probs, pi, pending.tokens, greedy,
                           pending.generators)
    sampled = pending.output.sampled_token_ids
    sampled[to_device(list(pending.rows), sampled.device), 0] = tokens.to(sampled.device,
                                                                         sampled.dtype)
    if pending.logprob_rows and pending.output.logprobs_tensors is not None:
        _write_logprobs(pending, logits, tokens)
    before = pending.tokens.long().cpu().tolist()
    after = tokens.cpu().tolist()
    bad_rows = bad.cpu().tolist()
    return Correction(
        tokens=tokens,
        changed=tuple(r for r, old, new in zip(pending.request_ids, before, after)
                      if old != new),
        degraded=tuple(r for r, b in zip(pending.request_ids, bad_rows) if b))


def _write_logprobs(pending: PendingCorrection, draft_logits: torch.Tensor,
                    tokens: torch.Tensor) -> None:
    """The unscaled log pi (temperature 1, no top-k/top-p: what logprobs report) at each
    row that asked for it, into vLLM's ``LogprobsTensors`` at the row's first slot."""
    index = to_device(list(pending.logprob_rows), draft_logits.device)
    q = draft_logits.index_select(0, index).softmax(dim=-1)
    rows: Sequence[RowAlignment] = [pending.alignments[j] for j in pending.logprob_rows]
    log_pi = log_pi_of(pending.raw_logits.to(q.device), q, rows, np.arange(len(rows)))
    ids, values, ranks = gather_logprobs(log_pi, pending.num_logprobs,
                                         tokens.index_select(0, index.to(tokens.device)))
    tensors = pending.output.logprobs_tensors
    slots = [pending.rows[j] * pending.width for j in pending.logprob_rows]
    for target, source in ((tensors.logprob_token_ids, ids), (tensors.logprobs, values),
                           (tensors.selected_token_ranks, ranks)):
        out = to_device(slots, target.device)
        target.index_copy_(0, out, source.to(target.device, target.dtype))
