"""The mixture inside vLLM's verification step, as plain tensor code (no vLLM import).

vLLM verifies the draft model's tokens against the target distribution with an exact
rejection sampler. Handing it ``log(pi)`` instead of the target logits makes that sampler
sample from the mixture ``pi = mix(p, q*)``; ``vllm_patches`` calls the functions here from
the patched vLLM internals. Every place where vLLM would otherwise emit a token of ``p``
is corrected after sampling (see ``finalize_step``):

* the first output token (sampled at prefill, where no proposal has seen the context
  yet) and any token sampled where the drafts were invalidated: sampled from ``p``, then
  corrected to a sample of ``pi`` once the drafter's first forward of the same step gives
  ``q*`` there (``correct_to_pi``: keep it with probability ``min(1, pi/p)``, else
  resample the residual), before vLLM's bookkeeping sees it (``vllm_patches``);
* the bonus token after all drafts are accepted (drawn from ``p``): dropped for every rule
  but ``base`` (costs at most one token per step; the draft has no ``q*`` there);
* a row with no drafts this step (drafts cut by the token budget, a request resumed after
  preemption): vLLM samples it from ``p``; the hook samples it again from ``pi``, with the
  ``q*`` its last proposal made for exactly that position (``resample_plain_rows``);
* greedy rows: verification targets the one-hot argmax of ``pi`` (vLLM itself only knows
  the argmax of ``p``).

The step's stages, in the order ``vllm_patches._sample`` runs them, each reading the
immutable ``StepPlan`` and returning what it found: ``mix_target_logits`` (inside vLLM's
rejection sampler) -> ``Mixed``; ``resample_plain_rows`` -> ``PlainSamples``;
``finalize_step`` -> ``Finalized``; ``logprob_sources`` and ``logprobs_of`` -> the
logprobs under pi to write into vLLM's tensors.

Shapes: ``num_tokens`` = draft positions of the step (request-major), ``V`` vocabulary.
The hot path has no per-token Python loop and one host sync per step (``finalize_step``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kad_kernels import mix_trusted
from server.engine.step_plan import (  # noqa: F401 - re-exported names of the hook's API
    EXTRA_ARGS_KEY,
    RowAlignment,
    StepPlan,
    draft_offsets,
)

logger = logging.getLogger(__name__)

PLACEHOLDER = -1  # vLLM's PLACEHOLDER_TOKEN_ID: "no token at this position"
# A logit_bias at or below it is a ban (OpenAI: "-100 should result in a ban"): the token is
# forbidden in pi itself, as a grammar's are (a bias on p alone leaves q*'s mass on it).
BAN_BIAS = -100.0
_DEFERRED = 1e-6  # a position "deferred something" above float rounding of alpha


@dataclass(frozen=True)
class Mixed:
    """What the mixing stage found (``mix_target_logits``, run inside vLLM's rejection
    sampler on the step's draft positions, request-major)."""

    draft_probs: torch.Tensor | None  # [num_tokens, V] the q* the drafts were verified with
    alpha: torch.Tensor  # [num_tokens] deferred mass at each draft position
    degraded: torch.Tensor  # [num_tokens] bool: a non-finite p or q* row, verified against p
    # Mixing rows verified without q* (drafts no stored proposal made, or none stored):
    # verified against p, counted inexact.
    inexact_rows: frozenset[int] = frozenset()


@dataclass(frozen=True)
class PlainSamples:
    """Zero-draft rows the hook sampled from pi itself (``resample_plain_rows``)."""

    rows: tuple[int, ...]  # batch rows
    tokens: torch.Tensor  # [len(rows)] their tokens
    q_star: torch.Tensor  # [len(rows), V] the q* each was drawn with (for logprobs)
    degraded: torch.Tensor  # [num_reqs] bool, same meaning as Mixed.degraded

    def q_of(self, row: int) -> torch.Tensor:
        return self.q_star[self.rows.index(row)]


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
    degraded: int = 0  # positions with a NaN/inf distribution (verified against p)


@dataclass(frozen=True)
class Finalized:
    """The step's outcome once ``finalize_step`` corrected vLLM's tokens."""

    stats: list[RowStepStats]


def _softmax_in_place(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised ``exp(logits - max)`` in ``logits``' own storage and its row sums."""
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    return logits, logits.sum(dim=-1, keepdim=True)


def mix_rows(
    logits: torch.Tensor,
    q_star: torch.Tensor,
    rule: str,
    param: torch.Tensor | None,
    greedy: torch.Tensor | None,
    forbidden: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log pi, alpha [n], bad [n])`` for target logits ``[n, V]`` (overwritten) and q*.

    ``forbidden`` ``[n, V]`` (bool): tokens a constraint forbids (a grammar's mask): they
    are forbidden in pi too, after mixing (q* can carry mass onto a token p no longer has),
    so pi is renormalised over the allowed tokens; greedy rows take the argmax of that pi.

    Peak memory: ``pi`` is the one new ``[n, V]`` tensor (``p`` lives in ``logits``), plus a
    boolean compare mask. A row with a non-finite ``p`` or ``q*`` (``bad``) gets ``log p``
    (or keeps its non-finite values when ``p`` itself is bad): that row degrades to the
    target alone, the rest of the batch is untouched.
    """
    p, p_sum = _softmax_in_place(logits)
    q_star = q_star.float()
    q_sum = q_star.sum(dim=-1, keepdim=True)
    p_ok = torch.isfinite(p_sum) & (p_sum > 0)
    q_ok = torch.isfinite(q_sum) & (q_sum > 0)
    pi, alpha = mix_trusted(p, p_sum, q_star, q_sum, rule, param)
    bad = ~(p_ok & q_ok)
    # In place, one pass each: a bad row becomes (unnormalised) p, and a row whose p is
    # itself non-finite becomes uniform (never NaN logits into vLLM's sampler).
    torch.where(bad, p, pi, out=pi)
    pi.nan_to_num_(nan=1.0, posinf=1.0)
    if forbidden is not None:
        pi.masked_fill_(forbidden, 0.0)
    alpha = torch.where(bad, 0.0, alpha).squeeze(-1)
    if greedy is not None:
        # Greedy-over-pi: a one-hot target at argmax(pi) on greedy rows, in place.
        best = pi.argmax(dim=-1, keepdim=True)
        pi.mul_((~greedy).unsqueeze(-1))
        pi.scatter_add_(-1, best, greedy.to(pi.dtype).unsqueeze(-1))
    return pi.log_(), alpha, bad.squeeze(-1)


def to_device(values: Any, device: torch.device, dtype: torch.dtype | None = None,
              ) -> torch.Tensor:
    """Host data (a list, array or CPU tensor) on ``device``. Off the CPU the copy goes
    from pinned memory without blocking: a copy from ordinary host memory blocks the
    stream, which would cancel vLLM's overlap of drafting with bookkeeping."""
    tensor = torch.as_tensor(values, dtype=dtype)
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def _params(rows: Sequence[RowAlignment | None], owners: np.ndarray,
            device: torch.device) -> torch.Tensor | None:
    """Per-token parameters ``[n, 1]`` of one rule group (a rule takes one or none)."""
    if len(owners) == 0 or rows[owners[0]].param is None:
        return None
    per_row = np.array([np.nan if r is None or r.param is None else r.param for r in rows],
                       dtype=np.float32)
    return to_device(per_row[owners], device).unsqueeze(-1)


def _greedy(rows: Sequence[RowAlignment | None], owners: np.ndarray,
            device: torch.device) -> torch.Tensor | None:
    per_row = np.array([r is not None and r.greedy for r in rows], dtype=bool)
    if not per_row[owners].any():
        return None
    return to_device(per_row[owners], device)


def mix_target_logits(
    target_logits: torch.Tensor,
    draft_probs: torch.Tensor | None,
    plan: StepPlan,
    without_q: frozenset[int] = frozenset(),
    forbidden: torch.Tensor | None = None,
) -> Mixed:
    """Turn ``target_logits`` into logits whose softmax is ``pi`` on every mixing row's
    draft positions (in place), and say what was found.

    ``target_logits`` ``[num_tokens, V]`` hold vLLM's float32 target after temperature/
    top-k/top-p (vLLM hands a fresh tensor that may be updated in place, and this does),
    ``draft_probs`` the draft's ``q*`` at the same positions, ``without_q`` the rows whose
    drafts no stored proposal made, ``forbidden`` ``[num_tokens, V]`` the tokens a
    constraint forbids at each position (None: none). Rows of non-mixing requests and rows
    without ``q*`` are
    left as they are. Rows are grouped per rule, each group in chunks of at most half the
    batch, so the hook never holds more than two ``[num_tokens, V]`` float32 temporaries.
    """
    num_tokens = target_logits.shape[0]
    device = target_logits.device
    alpha = torch.zeros(num_tokens, dtype=torch.float32, device=device)
    degraded = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    rows = plan.rows
    inexact = frozenset(
        i for i, r in enumerate(rows)
        if r is not None and r.mixes and plan.drafts[i]
        and (i in without_q or draft_probs is None))
    mixed = Mixed(draft_probs, alpha, degraded, inexact)
    if num_tokens == 0:
        return mixed
    if draft_probs is None:
        if inexact:
            logger.warning("verification without draft probabilities: pi cannot be formed")
        return mixed
    owners = plan.owners()
    rule_of_row = np.array([
        "" if r is None or not r.mixes or i in without_q or i in plan.padded_rows else r.rule
        for i, r in enumerate(rows)
    ] + [""], dtype=object)
    rule_of_token = rule_of_row[np.minimum(owners, len(rows))]
    # One rule over every position: mixed in place; else per rule in half-batch chunks.
    named = set(rule_of_token.tolist())
    whole = len(named) == 1 and "" not in named
    for rule, tokens in rule_groups(rule_of_token, None if whole else max(1, num_tokens // 2)):
        _mix_into(target_logits, draft_probs, None if whole else tokens, rule, owners,
                  rows, mixed, forbidden)
    return mixed


def rule_groups(rule_of: Sequence[str] | np.ndarray,
                chunk: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """``(rule, positions)`` for each rule named in ``rule_of`` (positions marked ``""`` are
    left out), in rule order, cut in chunks of at most ``chunk`` positions (None: whole)."""
    rule_of = np.asarray(rule_of, dtype=object)
    for rule in sorted(set(rule_of.tolist()) - {""}):
        positions = np.nonzero(rule_of == rule)[0]
        step = chunk or len(positions)
        for start in range(0, len(positions), step):
            yield rule, positions[start:start + step]


def _mix_into(target_logits: torch.Tensor, draft_probs: torch.Tensor,
              tokens: np.ndarray | None, rule: str, owners: np.ndarray,
              rows: Sequence[RowAlignment | None], mixed: Mixed,
              forbidden: torch.Tensor | None = None) -> None:
    """Replace the rows ``tokens`` (None: all) of ``target_logits`` by ``log pi``, and
    write their alpha and degraded flags into ``mixed``'s tensors."""
    device = target_logits.device
    selected = owners if tokens is None else owners[tokens]
    param = _params(rows, selected, device)
    greedy = _greedy(rows, selected, device)
    if tokens is None:
        log_pi, alpha, bad = mix_rows(target_logits, draft_probs, rule, param, greedy,
                                      forbidden)
        target_logits.copy_(log_pi)
        mixed.alpha.copy_(alpha)
        mixed.degraded.copy_(bad)
        return
    index = to_device(tokens, device)
    log_pi, alpha, bad = mix_rows(
        target_logits.index_select(0, index), draft_probs.index_select(0, index), rule,
        param, greedy, None if forbidden is None else forbidden.index_select(0, index))
    target_logits.index_copy_(0, index, log_pi)
    mixed.alpha.index_copy_(0, index, alpha)
    mixed.degraded.index_copy_(0, index, bad)


def sample_from_probs(probs: torch.Tensor,
                      generators: dict[int, torch.Generator]) -> torch.Tensor:
    """One token per row of ``probs`` ``[n, V]``: the exponential race (vLLM's own sampler),
    with row i's noise from ``generators[i]`` where the request is seeded."""
    noise = torch.empty_like(probs).exponential_()
    for row, generator in generators.items():
        noise[row].exponential_(generator=generator)
    return probs.div(noise).argmax(dim=-1)


def processed_pi(target_probs: torch.Tensor, q_star: torch.Tensor,
                 rows: Sequence[RowAlignment | None], owners: np.ndarray,
                 forbidden: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pi [n, V] normalised, bad [n])`` from the processed target ``target_probs``
    (temperature, top-k/top-p) and the draft's ``q_star`` at the same positions: position
    i mixes with the rule and parameter of batch row ``owners[i]``, and ``forbidden``
    tokens (a grammar's mask) get no mass. A bad row (non-finite p or q*) gets p."""
    device = target_probs.device
    pi = torch.empty_like(target_probs, dtype=torch.float32)
    bad = torch.zeros(len(owners), dtype=torch.bool, device=device)
    for rule, group in rule_groups([rows[o].rule for o in owners]):
        index = to_device(group, device)
        log_pi, _, group_bad = mix_rows(
            target_probs.index_select(0, index).float().log_(), q_star.index_select(0, index),
            rule, _params(rows, owners[group], device), None,
            None if forbidden is None else forbidden.index_select(0, index))
        pi.index_copy_(0, index, log_pi.softmax(dim=-1))
        bad.index_copy_(0, index, group_bad)
    return pi, bad


def resample_plain_rows(
    target_probs: torch.Tensor,
    q_star: torch.Tensor,
    batch_rows: Sequence[int],
    generators: dict[int, torch.Generator],
    plan: StepPlan,
    forbidden: torch.Tensor | None = None,
) -> PlainSamples:
    """Rows with no drafts this step: their token sampled from ``pi`` instead of ``p``.

    ``target_probs`` ``[n, V]`` is the processed target (temperature, top-k/top-p) at each
    row's sampled position, ``q_star`` ``[n, V]`` the draft's distribution at the same
    position (from its last proposal), ``batch_rows[j]`` the batch row of row j.
    ``generators`` are keyed by j.
    """
    owners = np.asarray(batch_rows)
    pi, bad = processed_pi(target_probs, q_star, plan.rows, owners, forbidden)
    tokens = sample_from_probs(pi, generators)
    greedy = _greedy(plan.rows, owners, pi.device)
    if greedy is not None:
        tokens = torch.where(greedy, pi.argmax(dim=-1), tokens)
    degraded = torch.zeros(plan.num_reqs, dtype=torch.bool, device=pi.device)
    degraded.index_copy_(0, to_device(owners, pi.device), bad)
    return PlainSamples(tuple(int(i) for i in batch_rows), tokens, q_star, degraded)


def uniform_draws(n: int, generators: dict[int, torch.Generator],
                  device: torch.device) -> torch.Tensor:
    """``[n]`` uniforms in [0, 1), row j's from ``generators[j]`` where it is seeded."""
    draws = torch.rand(n, device=device)
    for row, generator in generators.items():
        draws[row] = torch.rand(1, generator=generator, device=device)[0]
    return draws


def correct_to_pi(target_probs: torch.Tensor, pi: torch.Tensor, tokens: torch.Tensor,
                  greedy: torch.Tensor | None,
                  generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Tokens distributed as ``pi`` from ``tokens`` sampled from ``target_probs`` (p), each
    kept as often as possible: kept with probability ``min(1, pi(x) / p(x))``, else
    replaced by a sample of the residual ``(pi - p)+`` (the maximal coupling of p and pi:
    exact for pi, and the drafts made after x stay valid whenever x is kept). Greedy rows
    take the argmax of pi. Row j's draws come from ``generators[j]`` where seeded."""
    x = tokens.long().unsqueeze(-1)
    p_x = target_probs.float().gather(-1, x).squeeze(-1)
    pi_x = pi.gather(-1, x).squeeze(-1)
    residual = (pi - target_probs.float()).clamp_(min=0)
    has_residual = residual.sum(dim=-1) > 0
    keep = (uniform_draws(len(tokens), generators, pi.device) * p_x < pi_x) | ~has_residual
    replacement = sample_from_probs(residual, generators)
    out = torch.where(keep, x.squeeze(-1), replacement)
    if greedy is not None:
        out = torch.where(greedy, pi.argmax(dim=-1), out)
    return out


def write_first_slots(sampled: torch.Tensor, batch_rows: Sequence[int],
                      tokens: torch.Tensor) -> None:
    """``sampled[row, 0] = token`` for each row of ``batch_rows`` (vLLM's output tensor)."""
    if len(batch_rows):
        sampled[to_device(list(batch_rows), sampled.device), 0] = tokens.to(
            sampled.device, sampled.dtype)


def unscaled_log_pi(
    target_logits: torch.Tensor,
    q_star: torch.Tensor,
    temperature: torch.Tensor,
    rows: Sequence[RowAlignment | None],
    owners: np.ndarray,
) -> torch.Tensor:
    """``log pi`` ``[n, V]`` built from the *unscaled* distributions (temperature 1, no
    top-k/top-p), whatever the request samples with: what logprobs report, as vLLM's
    default ``raw_logprobs`` mode reports log p.

    ``target_logits`` are the target's raw logits, ``q_star`` the draft's distribution at
    the request's ``temperature`` T (vLLM's drafter divides by T): ``q = q_T ** T``
    renormalised recovers the unscaled q* exactly (tokens whose q_T underflowed to 0 keep
    q = 0, below 1e-30 of mass). Position i belongs to batch row ``owners[i]``, whose
    rule and parameter apply. A row with non-finite inputs gets ``log p``.
    """
    log_q = q_star.float().log().mul_(temperature.float().unsqueeze(-1))
    q = log_q.sub_(log_q.amax(dim=-1, keepdim=True)).exp_()
    return log_pi_of(target_logits, q, rows, owners)


def log_pi_of(target_logits: torch.Tensor, q: torch.Tensor,
              rows: Sequence[RowAlignment | None], owners: np.ndarray) -> torch.Tensor:
    """``log pi`` ``[n, V]`` from the target's raw logits and the draft's unscaled
    distribution ``q`` (rows need not sum to 1): position i mixes with the rule and
    parameter of batch row ``owners[i]``; a row with non-finite inputs gets ``log p``.
    A token the raw logits exclude (``-inf``: a grammar's mask, applied by vLLM before
    sampling; models themselves emit finite logits) is excluded from pi as well."""
    logits = target_logits.float()  # read only: each rule group mixes its own copy
    forbidden = torch.isneginf(logits)
    groups = list(rule_groups([rows[o].rule for o in owners]))
    if len(groups) == 1 and len(groups[0][1]) == len(owners):
        # One rule at every position (a scored prompt, a uniform batch): mix in place of
        # one copy, with no gather of q* nor scatter of the result.
        rule, _ = groups[0]
        log_pi, _, _ = mix_rows(logits.clone(), q, rule,
                                _params(rows, owners, logits.device), None, forbidden)
        return log_pi.log_softmax(dim=-1)
    out = torch.empty_like(logits)
    for rule, group in groups:
        index = to_device(group, logits.device)
        log_pi, _, _ = mix_rows(logits.index_select(0, index), q.index_select(0, index),
                                rule, _params(rows, owners[group], logits.device), None,
                                forbidden.index_select(0, index))
        out.index_copy_(0, index, log_pi)
    return out.log_softmax(dim=-1)


def gather_logprobs(logprobs: torch.Tensor, num_logprobs: int,
                    token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids [n, k+1], logprobs [n, k+1], ranks [n])``: column 0 the token's own, then the
    top ``k``; the rank counts the tokens at least as likely (vLLM's ``gather_logprobs``)."""
    token_ids = token_ids.long().unsqueeze(-1)
    own = logprobs.gather(-1, token_ids)
    ranks = (logprobs >= own).sum(dim=-1)
    if num_logprobs > 0:
        top, top_ids = torch.topk(logprobs, num_logprobs, dim=-1)
        return torch.cat([token_ids, top_ids], dim=1), torch.cat([own, top], dim=1), ranks
    return token_ids, own, ranks


def finalize_step(
    sampled: torch.Tensor,
    logits: torch.Tensor,
    plan: StepPlan,
    mixed: Mixed | None = None,
    plain: PlainSamples | None = None,
    corrected: frozenset[int] = frozenset(),
) -> Finalized:
    """Correct vLLM's sampled tokens (in place) and return the step's per-request stats.

    ``sampled`` is ``[num_reqs, 1 + max_spec_len]`` (placeholder -1 for no token);
    ``logits`` the target logits the step sampled from (rows as in ``plan.first_rows``);
    ``mixed`` what verification found (None: nothing verified), ``plain`` the rows the hook
    sampled from pi, ``corrected`` the rows sampled from p that the proposal corrects to pi
    (``correct_to_pi``; not inexact).

    One device-to-host read brings the sampled tokens, the greedy rows' argmax, alpha and
    degraded flags together; every correction (padded rows, greedy rows,
    dropped bonus tokens) is made on that host copy and written back with one non-blocking
    copy.
    """
    num_reqs = plan.num_reqs
    drafts = plan.drafts
    device = sampled.device
    resampled = frozenset(plain.rows) if plain is not None else frozenset()
    inexact_rows = mixed.inexact_rows if mixed is not None else frozenset()
    # Greedy rows whose last token still comes from p at a plain/bonus position (no q*):
    # argmax p there, as vLLM would for a greedy request.
    greedy = [i for i, row in enumerate(plan.rows)
              if row is not None and row.greedy and i not in resampled
              and drafts[i] == 0]
    num_tokens = plan.num_tokens
    parts = [
        sampled[:num_reqs].reshape(-1),
        mixed.alpha if mixed is not None else torch.zeros(num_tokens, device=device),
        mixed.degraded if mixed is not None else torch.zeros(num_tokens, device=device),
        plain.degraded if plain is not None else torch.zeros(num_reqs, device=device),
        logits.index_select(0, to_device([plan.first_rows[i] for i in greedy],
                                         logits.device, torch.long)).argmax(-1)
        if greedy else torch.zeros(0, device=device),
    ]
    sizes = [part.numel() for part in parts]
    packed = torch.cat([part.to(device, torch.float64) for part in parts]).cpu().numpy()
    # ^ the step's one device-to-host read (vLLM syncs on the tokens anyway)
    tokens_np, alpha_np, degraded_np, plain_np, greedy_np = np.split(
        packed, np.cumsum(sizes)[:-1])
    width = sampled.shape[1]
    tokens = tokens_np.astype(np.int64).reshape(num_reqs, width)
    original = tokens.copy()
    for i in plan.padded_rows:
        # Only a padded row's first position has a real context.
        tokens[i, 1:] = PLACEHOLDER
    tokens[greedy, 0] = greedy_np.astype(np.int64)
    valid_before = (tokens != PLACEHOLDER).sum(axis=-1)
    offsets = plan.offsets()
    results: list[RowStepStats] = []
    for i, row in enumerate(plan.rows):
        if row is None:
            continue
        n_draft = drafts[i]
        n_valid = int(valid_before[i])
        if n_valid == 0 or not plan.emitting[i]:
            continue  # a partial prefill chunk or a discarded row: nothing was sampled
        accepted = n_valid - 1  # vLLM always appends one recovered or bonus token
        emitted = n_valid
        if row.mixes and n_draft > 0 and accepted == n_draft:
            # The bonus token came from p at a position with no q*: dropped.
            tokens[i, n_draft] = PLACEHOLDER
            emitted -= 1
        plain_from_p = (n_draft == 0 and row.mixes and i not in resampled
                        and i not in corrected)
        inexact = int(i in inexact_rows or plain_from_p)
        positions = min(n_draft, accepted + 1)
        span = slice(offsets[i], offsets[i] + positions)
        row_alpha = alpha_np[span]
        results.append(RowStepStats(
            request_id=row.request_id,
            drafted=n_draft,
            accepted=accepted,
            emitted=emitted,
            positions=positions,
            alpha_sum=float(row_alpha.sum()),
            deferred_positions=int((row_alpha > _DEFERRED).sum()),
            inexact=inexact,
            degraded=int(degraded_np[span].sum() + (plain_np[i] if n_draft == 0 else 0)),
        ))
    if not np.array_equal(tokens, original):
        sampled[:num_reqs].copy_(to_device(tokens, device, sampled.dtype))
    return Finalized(results)


@dataclass(frozen=True)
class LogprobSources:
    """Where each reported logprob comes from (``logprob_sources``). Slots are rows of
    vLLM's ``LogprobsTensors`` (``row * width + j``); logits rows index the step's target
    logits. ``pi_*``: slots verified or sampled against pi with a q* (``q_star`` row by
    row, ``pi_owners`` their batch rows); ``p_*``: every other slot of a row that asked
    for logprobs under pi whose token may differ from vLLM's own (drafts verified without
    q*, a corrected row's until its correction writes log pi): log p of the final token
    (counted inexact where pi was meant)."""

    pi_slots: tuple[int, ...]
    pi_logit_rows: tuple[int, ...]
    pi_owners: tuple[int, ...]
    q_star: torch.Tensor | None
    p_slots: tuple[int, ...]
    p_logit_rows: tuple[int, ...]


def logprob_sources(plan: StepPlan, width: int, mixed: Mixed | None = None,
                    plain: PlainSamples | None = None) -> LogprobSources:
    """The logprobs stage's layout: which slots report log pi (with which q*) and which
    log p. ``width`` is the sampled tokens' ``1 + max drafts`` (the rejection sampler's
    layout; 1 when nothing was verified)."""
    offsets = plan.offsets()
    pi_slots: list[int] = []
    pi_logit_rows: list[int] = []
    pi_owners: list[int] = []
    q_parts: list[torch.Tensor] = []
    p_slots: list[int] = []
    p_logit_rows: list[int] = []
    resampled = frozenset(plain.rows) if plain is not None else frozenset()
    for i, row in enumerate(plan.rows):
        if row is None or not row.wants_logprobs_under_pi:
            continue
        n = plan.drafts[i]
        first = plan.first_rows[i]  # a padded row's first position: its one real one
        with_q = 0  # leading slots verified against pi with q*
        if (row.mixes and n > 0 and mixed is not None and mixed.draft_probs is not None
                and i not in mixed.inexact_rows):
            with_q = n
            pi_slots += range(i * width, i * width + n)
            pi_logit_rows += range(first, first + n)
            q_parts.append(mixed.draft_probs[offsets[i]:offsets[i] + n])
            pi_owners += [i] * n
        elif row.mixes and i in resampled:
            with_q = 1
            pi_slots.append(i * width)
            pi_logit_rows.append(first)
            q_parts.append(plain.q_of(i).unsqueeze(0))
            pi_owners.append(i)
        p_slots += [i * width + j for j in range(with_q, n + 1)]
        p_logit_rows += [first + j for j in range(with_q, n + 1)]
    return LogprobSources(tuple(pi_slots), tuple(pi_logit_rows), tuple(pi_owners),
                          torch.cat(q_parts) if q_parts else None,
                          tuple(p_slots), tuple(p_logit_rows))


def logprobs_of(raw_logits: torch.Tensor, sources: LogprobSources, plan: StepPlan,
                temperature: torch.Tensor | None,
                ) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """``[(slots, log-probabilities [len(slots), V])]``: log p at ``sources.p_*`` and the
    unscaled log pi at ``sources.pi_*``, from the step's raw target logits.
    ``temperature`` ``[num_reqs]`` (None: 1) recovers the unscaled q* (``unscaled_log_pi``).
    """
    device = raw_logits.device
    out = []
    if sources.p_slots:
        out.append((sources.p_slots, raw_logits.index_select(
            0, to_device(list(sources.p_logit_rows), device)).float().log_softmax(-1)))
    if sources.pi_slots:
        owners = np.asarray(sources.pi_owners)
        per_position = (torch.ones(len(owners), device=device) if temperature is None
                        else temperature.index_select(0, to_device(owners, device)))
        out.append((sources.pi_slots, unscaled_log_pi(
            raw_logits.index_select(0, to_device(list(sources.pi_logit_rows), device)),
            sources.q_star.to(device), per_position, plan.rows, owners)))
    return out
