"""The mixture inside vLLM's verification step, as plain tensor code (no vLLM import).

vLLM verifies the draft model's tokens against the target distribution with an exact
rejection sampler. Handing it ``log(pi)`` instead of the target logits makes that sampler
sample from the mixture ``pi = mix(p, q*)``; ``vllm_patches`` calls the functions here from
the patched vLLM internals. Every place where vLLM would otherwise emit a token of ``p``
is corrected after sampling (see ``finalize_step``):

* the first output token (sampled by the plain sampler at prefill, with no ``q*`` yet):
  the engine withholds the prompt's last token and this module forces it as the first
  "sampled" token, so every real output token goes through verification;
* the bonus token after all drafts are accepted (drawn from ``p``): dropped for every rule
  but ``base`` (costs at most one token per step; the draft has no ``q*`` there);
* a row with no drafts this step (drafts cut by the token budget, a request resumed after
  preemption): vLLM samples it from ``p``; the hook samples it again from ``pi``, with the
  ``q*`` its last proposal made for exactly that position (``resample_plain_rows``);
* greedy rows: verification targets the one-hot argmax of ``pi`` (vLLM itself only knows
  the argmax of ``p``).

Shapes: ``num_tokens`` = draft positions of the step (request-major), ``V`` vocabulary.
The hot path has no per-token Python loop and one host sync per step (``finalize_step``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kad_kernels import mix_trusted

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
    logprobs: int | None = None  # top alternatives asked for (0: the token's own only)
    # Prompt scoring: output tokens 1, 2, ... are forced to be these (the prompt's tokens
    # after the two vLLM was given as prompt and withheld token), see ``force_tokens``.
    forced: tuple[int, ...] = ()

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
            logprobs=settings.get("logprobs"),
            forced=tuple(settings.get("forced") or ()),
        )

    @property
    def mixes(self) -> bool:
        """Whether verification must use ``pi`` (``base`` is vLLM's own target ``p``)."""
        return self.rule != "base"


@dataclass
class StepState:
    """One engine step's hook state, created by the ``_sample`` wrapper and passed on."""

    rows: list[RowAlignment | None]
    num_draft_tokens: list[int] = field(default_factory=list)
    alpha: torch.Tensor | None = None  # [num_tokens] deferred mass at each draft position
    # [num_tokens] bool: a non-finite p or q* row, verified against p (or left to vLLM).
    degraded: torch.Tensor | None = None
    inexact_rows: set[int] = field(default_factory=set)  # mixing rows verified without q*
    # Rows whose drafts are vLLM's placeholders (-1, always rejected; no q* exists), or
    # drafts that no proposal produced (no q* either): verified against p, counted inexact
    # unless the token is the withheld prompt token.
    placeholder_rows: set[int] = field(default_factory=set)
    # Zero-draft rows the hook sampled from pi itself (``resample_plain_rows``).
    resampled_rows: set[int] = field(default_factory=set)
    plain_degraded: torch.Tensor | None = None  # [num_reqs] bool, same meaning as degraded
    # The q* vLLM verified this step's drafts against ([num_tokens, V], request-major), and
    # the q* each resampled zero-draft row was drawn with: what logprobs under pi need.
    draft_probs: torch.Tensor | None = None
    plain_q: dict[int, torch.Tensor] = field(default_factory=dict)
    # Rows whose drafts are the scheduler's padding (``-1`` drafts: vLLM pads a request
    # admitted with one token left to compute, so the step keeps one shape). Only their
    # first position has a real context: they are sampled like zero-draft rows, at that
    # position, and every later slot is dropped.
    padded_rows: frozenset[int] = frozenset()
    # [num_reqs] tokens each row emitted this step (``finalize_step``, host numbers): the
    # withheld prompt token counts, a discarded row's sample does not.
    emitted: np.ndarray | None = None

    def drafts_of(self, row: int) -> int:
        """Real drafts of ``row`` this step (0 for a padded row)."""
        if row in self.padded_rows or row >= len(self.num_draft_tokens):
            return 0
        return self.num_draft_tokens[row]


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log pi, alpha [n], bad [n])`` for target logits ``[n, V]`` (overwritten) and q*.

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


def _params(rows: list[RowAlignment | None], owners: np.ndarray,
            device: torch.device) -> torch.Tensor | None:
    """Per-token parameters ``[n, 1]`` of one rule group (a rule takes one or none)."""
    if len(owners) == 0 or rows[owners[0]].param is None:
        return None
    per_row = np.array([np.nan if r is None or r.param is None else r.param for r in rows],
                       dtype=np.float32)
    return to_device(per_row[owners], device).unsqueeze(-1)


def _greedy(rows: list[RowAlignment | None], owners: np.ndarray,
            device: torch.device) -> torch.Tensor | None:
    per_row = np.array([r is not None and r.greedy for r in rows], dtype=bool)
    if not per_row[owners].any():
        return None
    return to_device(per_row[owners], device)


def mix_target_logits(
    target_logits: torch.Tensor,
    draft_probs: torch.Tensor | None,
    num_draft_tokens: list[int],
    state: StepState,
) -> torch.Tensor:
    """Target logits whose softmax is ``pi`` on every mixing row's draft positions.

    ``target_logits`` ``[num_tokens, V]`` hold vLLM's float32 target after temperature/
    top-k/top-p (vLLM hands a fresh tensor that may be updated in place, and this does),
    ``draft_probs`` the draft's ``q*`` at the same positions. Rows of non-mixing requests
    and rows without ``q*`` are left as they are. Rows are grouped per rule, each group
    in chunks of at most half the batch, so the hook never holds more than two
    ``[num_tokens, V]`` float32 temporaries.
    """
    num_tokens = target_logits.shape[0]
    device = target_logits.device
    state.alpha = torch.zeros(num_tokens, dtype=torch.float32, device=device)
    state.degraded = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    rows = state.rows
    if num_tokens == 0:
        return target_logits
    owners = np.repeat(np.arange(len(num_draft_tokens)), num_draft_tokens)
    rule_of_row = np.array([
        "" if r is None or not r.mixes or i in state.placeholder_rows
        or i in state.padded_rows else r.rule
        for i, r in enumerate(rows)
    ] + [""], dtype=object)
    rule_of_token = rule_of_row[np.minimum(owners, len(rows))]
    for i, r in enumerate(rows):
        if r is not None and r.mixes and num_draft_tokens[i] and i not in state.padded_rows and (
            i in state.placeholder_rows or draft_probs is None
        ):
            state.inexact_rows.add(i)
    if draft_probs is None:
        if state.inexact_rows:
            logger.warning("verification without draft probabilities: pi cannot be formed")
        return target_logits
    # One rule over every position: mixed in place; else per rule in half-batch chunks.
    named = set(rule_of_token.tolist())
    whole = len(named) == 1 and "" not in named
    for rule, tokens in rule_groups(rule_of_token, None if whole else max(1, num_tokens // 2)):
        _mix_into(target_logits, draft_probs, None if whole else tokens, rule, owners, state)
    return target_logits


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
              state: StepState) -> None:
    """Replace the rows ``tokens`` (None: all) of ``target_logits`` by ``log pi``."""
    device = target_logits.device
    selected = owners if tokens is None else owners[tokens]
    param = _params(state.rows, selected, device)
    greedy = _greedy(state.rows, selected, device)
    if tokens is None:
        log_pi, alpha, bad = mix_rows(target_logits, draft_probs, rule, param, greedy)
        target_logits.copy_(log_pi)
        state.alpha.copy_(alpha)
        state.degraded.copy_(bad)
        return
    index = to_device(tokens, device)
    log_pi, alpha, bad = mix_rows(target_logits.index_select(0, index),
                                  draft_probs.index_select(0, index), rule, param, greedy)
    target_logits.index_copy_(0, index, log_pi)
    state.alpha.index_copy_(0, index, alpha)
    state.degraded.index_copy_(0, index, bad)


def sample_from_probs(probs: torch.Tensor,
                      generators: dict[int, torch.Generator]) -> torch.Tensor:
    """One token per row of ``probs`` ``[n, V]``: the exponential race (vLLM's own sampler),
    with row i's noise from ``generators[i]`` where the request is seeded."""
    noise = torch.empty_like(probs).exponential_()
    for row, generator in generators.items():
        noise[row].exponential_(generator=generator)
    return probs.div(noise).argmax(dim=-1)


def resample_plain_rows(
    sampled: torch.Tensor,
    target_probs: torch.Tensor,
    q_star: torch.Tensor,
    batch_rows: list[int],
    generators: dict[int, torch.Generator],
    state: StepState,
) -> None:
    """Rows with no drafts this step: sample their token from ``pi`` instead of ``p``.

    ``target_probs`` ``[n, V]`` is the processed target (temperature, top-k/top-p) at each
    row's sampled position, ``q_star`` ``[n, V]`` the draft's distribution at the same
    position (from its last proposal), ``batch_rows[j]`` the batch row of row j, whose
    ``sampled[row, 0]`` is replaced. ``generators`` are keyed by j.
    """
    rows = [state.rows[i] for i in batch_rows]
    device = target_probs.device
    rule_of = [r.rule for r in rows]
    owners = np.asarray(batch_rows)
    tokens = torch.empty(len(rows), dtype=torch.long, device=device)
    degraded = torch.zeros(len(state.rows), dtype=torch.bool, device=device)
    for rule, group in rule_groups(rule_of):
        index = to_device(group, device)
        logits = target_probs.index_select(0, index).log_()
        log_pi, _, bad = mix_rows(logits, q_star.index_select(0, index), rule,
                                  _params(state.rows, owners[group], device),
                                  _greedy(state.rows, owners[group], device))
        pi = log_pi.exp_()
        local = {k: generators[int(j)] for k, j in enumerate(group) if int(j) in generators}
        tokens.index_copy_(0, index, sample_from_probs(pi, local))
        degraded.index_copy_(0, to_device(owners[group], device), bad)
    batch_index = to_device(batch_rows, sampled.device)
    sampled[batch_index, 0] = tokens.to(sampled.dtype)
    state.resampled_rows.update(batch_rows)
    state.plain_q.update(zip(batch_rows, q_star.unbind(0)))
    state.plain_degraded = degraded


def draft_offsets(num_draft_tokens: list[int]) -> np.ndarray:
    """``[num_reqs + 1]`` start of each row's draft positions (request-major layout)."""
    return np.concatenate([[0], np.cumsum(num_draft_tokens)]).astype(int)


def forced_token(row: RowAlignment, output_index: int) -> int | None:
    """The token output ``output_index`` must be for a scoring row (None: free)."""
    k = output_index - 1  # output 0 is the withheld prompt token
    return row.forced[k] if 0 <= k < len(row.forced) else None


def force_tokens(sampled: np.ndarray, rows: list[RowAlignment | None],
                 num_draft_tokens: list[int], draft_tokens: np.ndarray,
                 output_lens: np.ndarray) -> list[int]:
    """Scoring rows: their outputs are the prompt's own tokens, not samples.

    ``sampled`` ``[num_reqs, width]`` (host copy, changed in place), ``draft_tokens`` the
    step's drafts (request-major), ``output_lens[i]`` the tokens row i output before this
    step. Each forced slot keeps the verification's position (so logprobs there are log pi
    of the prompt token given the prompt before it): slots are forced while the drafts
    match the prompt (the proposer drafts the prompt: ``HookContext.next_drafts``), up to and
    including the first slot that does not; everything after is dropped, the bonus slot
    too (it has no q*). Returns the rows changed.
    """
    changed = []
    offsets = draft_offsets(num_draft_tokens)
    for i, row in enumerate(rows):
        if row is None or not row.forced:
            continue
        n = num_draft_tokens[i] if i < len(num_draft_tokens) else 0
        kept = 0
        # Draft slots only (the bonus slot has no q*); a zero-draft row's one slot.
        for j in range(max(n, 1)):
            token = forced_token(row, int(output_lens[i]) + j)
            if token is None:
                break
            sampled[i, j] = token
            kept = j + 1
            if n and draft_tokens[offsets[i] + j] != token:
                break
        if kept:
            sampled[i, kept:] = PLACEHOLDER
            changed.append(i)
    return changed


def unscaled_log_pi(
    target_logits: torch.Tensor,
    q_star: torch.Tensor,
    temperature: torch.Tensor,
    rows: list[RowAlignment | None],
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
    logits = target_logits.float()  # read only: each rule group mixes its own copy
    log_q = q_star.float().log().mul_(temperature.float().unsqueeze(-1))
    q = log_q.sub_(log_q.amax(dim=-1, keepdim=True)).exp_()
    out = torch.empty_like(logits)
    for rule, group in rule_groups([rows[o].rule for o in owners]):
        index = to_device(group, logits.device)
        log_pi, _, _ = mix_rows(logits.index_select(0, index), q.index_select(0, index),
                                rule, _params(rows, owners[group], logits.device), None)
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


@dataclass(frozen=True)
class ScoringStep:
    """What forcing scored prompts needs: the step's drafts (device, request-major) and
    the tokens each row output before this step."""

    draft_tokens: torch.Tensor | None
    output_lens: np.ndarray


def finalize_step(
    sampled: torch.Tensor,
    logits: torch.Tensor,
    bonus_logits_rows: list[int] | None,
    first_step: list[bool],
    emitting: list[bool],
    state: StepState,
    scoring: ScoringStep | None = None,
) -> list[RowStepStats]:
    """Correct vLLM's sampled tokens and return the step's per-request stats.

    ``sampled`` is ``[num_reqs, 1 + max_spec_len]`` (placeholder -1 for no token);
    ``logits`` the target logits the step sampled from, ``bonus_logits_rows[i]`` the row of
    ``logits`` holding request i's bonus/plain position (``None``: row i itself, the plain
    sampler's layout). ``first_step[i]``: this step samples request i's first output token.
    ``emitting[i]``: row i's sample is kept (False for a partial prefill chunk).

    One device-to-host read brings the sampled tokens, the greedy rows' argmax, the drafts
    of scored prompts, alpha and degraded flags together; every correction (withheld token,
    padded rows, greedy rows, forced prompt tokens, dropped bonus tokens) is made on that
    host copy and written back with one non-blocking copy.
    """
    num_reqs = len(state.rows)
    layout = state.num_draft_tokens or [0] * num_reqs  # vLLM's draft slots per row
    drafts = [state.drafts_of(i) for i in range(num_reqs)]
    device = sampled.device
    withheld = [row is not None and first_step[i] and row.first_token is not None
                for i, row in enumerate(state.rows)]
    # Greedy rows whose last token still comes from p at a plain/bonus position (no q*):
    # argmax p there, as vLLM would for a greedy request.
    greedy = [i for i, row in enumerate(state.rows)
              if row is not None and row.greedy and i not in state.resampled_rows
              and drafts[i] == 0 and not withheld[i]]
    sources = [i if bonus_logits_rows is None else bonus_logits_rows[i] - layout[i]
               for i in greedy]
    num_tokens = sum(layout)
    parts = [
        sampled[:num_reqs].reshape(-1),
        state.alpha if state.alpha is not None else torch.zeros(num_tokens, device=device),
        state.degraded if state.degraded is not None else torch.zeros(num_tokens,
                                                                      device=device),
        state.plain_degraded if state.plain_degraded is not None
        else torch.zeros(num_reqs, device=device),
        logits.index_select(0, to_device(sources, logits.device, torch.long)).argmax(-1)
        if greedy else torch.zeros(0, device=device),
        scoring.draft_tokens.reshape(-1)
        if scoring is not None and scoring.draft_tokens is not None
        else torch.zeros(0, device=device),
    ]
    sizes = [part.numel() for part in parts]
    packed = torch.cat([part.to(device, torch.float64) for part in parts]).cpu().numpy()
    # ^ the step's one device-to-host read (vLLM syncs on the tokens anyway)
    tokens_np, alpha_np, degraded_np, plain_np, greedy_np, drafts_np = np.split(
        packed, np.cumsum(sizes)[:-1])
    width = sampled.shape[1]
    tokens = tokens_np.astype(np.int64).reshape(num_reqs, width)
    original = tokens.copy()
    for i, row in enumerate(state.rows):
        if withheld[i]:
            # Prefill of prompt[:-1]: the withheld last prompt token is the one output; any
            # later slot (a padded row's) was sampled after a placeholder, not a real token.
            tokens[i, 0] = row.first_token
            tokens[i, 1:] = PLACEHOLDER
        elif i in state.padded_rows:
            tokens[i, 1:] = PLACEHOLDER
    tokens[greedy, 0] = greedy_np.astype(np.int64)
    if scoring is not None:
        force_tokens(tokens, state.rows, layout, drafts_np.astype(np.int64),
                     scoring.output_lens)
    valid_before = (tokens != PLACEHOLDER).sum(axis=-1)
    offsets = draft_offsets(layout)
    results: list[RowStepStats] = []
    state.emitted = np.zeros(num_reqs, dtype=np.int64)
    for i, row in enumerate(state.rows):
        if row is None:
            continue
        n_draft = drafts[i]
        if withheld[i]:
            state.emitted[i] = 1
            continue  # the withheld prompt token: not generated, not counted
        n_valid = int(valid_before[i])
        if n_valid == 0 or not emitting[i]:
            continue  # a partial prefill chunk or a discarded row: nothing was sampled
        accepted = n_valid - 1  # vLLM always appends one recovered or bonus token
        emitted = n_valid
        if row.mixes and n_draft > 0 and accepted == n_draft:
            # The bonus token came from p at a position with no q*: dropped.
            tokens[i, n_draft] = PLACEHOLDER
            emitted -= 1
        state.emitted[i] = emitted
        plain_from_p = n_draft == 0 and row.mixes and i not in state.resampled_rows
        inexact = int(i in state.inexact_rows or plain_from_p)
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
    return results
