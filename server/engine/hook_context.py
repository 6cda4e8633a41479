"""The hook's state for one model runner, owned by the engine config kad-serve passes in.

One ``HookContext`` per engine per process: it lives on the ``HookSettings`` that kad-serve
hands vLLM as ``VllmConfig.additional_config``, so the runner and its drafter (whose config
shares that object) reach the same context through their own ``vllm_config``, and nothing
is kept at module level or pushed into vLLM's objects. A context never crosses a process:
pickled (vLLM ships its config to the engine core and workers) it arrives empty.

What it carries between the calls of one engine step, all keyed by request id or read in
vLLM's own batch order (``input_batch.req_ids``), never by call counts or shape guesses
(the step in progress itself reaches the module-level ``rejection_sample`` through a
ContextVar scoped to one ``_sample`` call, ``vllm_patches._STEP_IN_PROGRESS``):

* ``rows``: each request's settings (``RowAlignment``), parsed once per request;
* ``next_drafts``: per request id, what the next proposal must do for it (greedy draft),
  computed by ``_sample``;
* ``draft_pass``: the proposal in progress (``DraftPass``), set around the runner's
  ``propose_draft_token_ids`` with the batch's rows in ``input_batch.req_ids`` order;
* ``draft_probs``: each request's q* until its drafts are verified (``DraftProbStore``);
* ``pending_correction``: tokens sampled from p awaiting the proposal's q*
  (``first_token``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from server.engine.draft_probs import DraftProbStore
from server.engine.first_token import PendingCorrection
from server.engine.prompt_scoring import HiddenStateCapture
from server.engine.stats_channel import StatsSender
from server.engine.step_plan import RowAlignment, StepPlan
from server.engine.verification_hook import to_device

logger = logging.getLogger(__name__)

_SAMPLING_EPS = 1e-5  # vLLM's ``_SAMPLING_EPS``: a temperature below it is greedy


@dataclass(frozen=True)
class NextDrafts:
    """What the next proposal drafts for one request: the argmax of q* (greedy-over-pi
    rows, whose target is one-hot)."""

    greedy: bool = False


def next_drafts(plan: StepPlan) -> dict[str, NextDrafts]:
    """Per vLLM request id, what the proposal that follows this step drafts for it: the
    argmax of q* for greedy-over-pi rows."""
    return {plan.req_ids[i]: NextDrafts(greedy=True) for i, row in enumerate(plan.rows)
            if row is not None and row.greedy}


class DraftPass:
    """One proposal's draft steps over a batch whose rows are ``req_ids`` (vLLM's order),
    created per proposal, not shared with the sampler."""

    def __init__(self, req_ids: Sequence[str], plans: Mapping[str, NextDrafts]) -> None:
        self.num_rows = len(req_ids)
        self.greedy_rows = [i for i, r in enumerate(req_ids) if plans.get(r, NextDrafts()).greedy]
        self._greedy_masks: dict[torch.device, torch.Tensor] = {}

    def greedy_mask(self, device: torch.device) -> torch.Tensor:
        """``[num_rows]`` bool, the greedy-over-pi rows (one copy per proposal)."""
        if device not in self._greedy_masks:
            mask = torch.zeros(self.num_rows, dtype=torch.bool)
            mask[self.greedy_rows] = True
            self._greedy_masks[device] = to_device(mask, device)
        return self._greedy_masks[device]

    def sample(self, logits: torch.Tensor, sampling_metadata: Any,
               use_fp64_gumbel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft tokens and q* for one draft step (replaces vLLM's
        ``llm_base_proposer.compute_probs_and_sample_next_token``).

        As upstream, with three differences: q* is computed from float32 logits (a bf16
        drafter's logits divided by T in bf16 shift q* by up to 0.1 nat, which logprobs
        under pi would then report); a seeded row draws its noise from its own generator
        (upstream: "TODO: Consider seeds"); greedy-over-pi rows draft the argmax of q*.
        """
        from vllm.v1.spec_decode.llm_base_proposer import (
            empty_exponential_noise_like,
            sample_with_exponential_noise,
        )

        temperature = sampling_metadata.temperature
        is_greedy = temperature < _SAMPLING_EPS
        logits = logits.float()
        logits.div_(torch.where(is_greedy, 1.0, temperature).view(-1, 1))
        probs = logits.softmax(dim=-1)
        noise = empty_exponential_noise_like(probs, use_fp64_gumbel)
        noise.exponential_()
        for row, generator in sampling_metadata.generators.items():
            if row < noise.shape[0]:
                noise[row].exponential_(generator=generator)
        tokens = sample_with_exponential_noise(probs.clone(), noise)
        if not sampling_metadata.all_random or self.greedy_rows:
            greedy = is_greedy | self.greedy_mask(is_greedy.device)
            tokens = torch.where(greedy, probs.argmax(dim=-1), tokens)
        return tokens, probs


@dataclass(eq=False)
class HookContext:
    """The hook's state in one process for one engine (see the module docstring)."""

    draft_probs: DraftProbStore = field(default_factory=DraftProbStore)
    next_drafts: dict[str, NextDrafts] = field(default_factory=dict)
    # Each request's settings, parsed from its sampling params once, while it is in the
    # batch (``rows_of``); by vLLM request id.
    rows: dict[str, RowAlignment | None] = field(default_factory=dict)
    draft_pass: DraftPass | None = None
    # The scoring rows' drafter hidden states of this step, from the proposal to the
    # bookkeeping that computes prompt logprobs (``prompt_scoring``).
    scoring_capture: HiddenStateCapture | None = None
    # This step's rows sampled from p before any proposal saw their context, from
    # ``_sample`` to the proposal that corrects them to pi (``first_token``).
    pending_correction: PendingCorrection | None = None
    # vLLM applied a grammar bitmask to this step's logits (``sample_tokens``).
    step_constrained: bool = False
    sender: StatsSender | None = None
    sender_endpoint: str | None = None
    logged_degraded: bool = False
    logged_unaligned_draft: bool = False

    def rows_of(self, req_ids: Sequence[str],
                requests: Mapping[str, Any]) -> list[RowAlignment | None]:
        """The batch's rows in ``req_ids`` order: a request's ``extra_args`` are parsed the
        first step it is in the batch, not every step; requests that left are forgotten."""
        known, rows = self.rows, {}
        for req_id in req_ids:
            if req_id in known:
                rows[req_id] = known[req_id]
            else:
                state = requests.get(req_id)
                params = None if state is None else state.sampling_params
                rows[req_id] = RowAlignment.from_extra_args(getattr(params, "extra_args", None))
        self.rows = rows
        return [rows[req_id] for req_id in req_ids]

    def scores(self, request_id: str) -> bool:
        """Whether a request in this step's batch is a prompt scoring request."""
        row = self.rows.get(request_id)
        return row is not None and row.scores

    def sender_for(self, endpoint: str | None) -> StatsSender | None:
        if endpoint != self.sender_endpoint:
            self.sender_endpoint = endpoint
            self.sender = None if not endpoint else StatsSender(endpoint)
        return self.sender

    def __reduce__(self):
        # State is per process: a context shipped with vLLM's config arrives empty.
        return (HookContext, ())

    def __deepcopy__(self, memo: dict) -> HookContext:
        # vLLM may deep-copy its config within a process (e.g. the drafter's config): the
        # copy must reach this same context, not a second one.
        return self
