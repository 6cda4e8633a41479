"""What one engine step is, read once from vLLM's batch before anything is sampled.

``StepPlan`` is immutable: ``vllm_patches`` builds it at the top of ``_sample`` from host
data vLLM already has (the batch's request ids and sampling params, the scheduled drafts,
the sequence lengths, the discard mask), and every stage of the step reads it instead of
deriving rows, offsets or flags again. The stages (``verification_hook``) return what they
found; nothing in a plan changes while the step runs. No vLLM import here: plans are made
from plain values in the unit tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

EXTRA_ARGS_KEY = "kad"


@dataclass(frozen=True)
class RowAlignment:
    """One request's settings, read from ``SamplingParams.extra_args['kad']`` (once per
    request: ``HookContext.rows_of`` keeps them while the request is in the batch)."""

    request_id: str
    rule: str
    param: float | None = None
    greedy: bool = False  # temperature 0 requested: follow argmax(pi), sent as temperature 1
    logprobs: int | None = None  # top alternatives asked for (0: the token's own only)
    # Prompt scoring from prefill: vLLM computes this request's prompt logprobs, the hook
    # replaces them by log pi (``prompt_scoring``); its one sampled token is vLLM's own.
    scores: bool = False

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
            logprobs=settings.get("logprobs"),
            scores=bool(settings.get("scores", False)),
        )

    @property
    def mixes(self) -> bool:
        """Whether verification must use ``pi`` (``base`` is vLLM's own target ``p``)."""
        return self.rule != "base"

    @property
    def wants_logprobs_under_pi(self) -> bool:
        return self.mixes and self.logprobs is not None


def draft_offsets(num_draft_tokens: Sequence[int]) -> np.ndarray:
    """``[num_reqs + 1]`` start of each row's draft positions (request-major layout)."""
    return np.concatenate([[0], np.cumsum(np.asarray(num_draft_tokens, dtype=np.int64))]
                          ).astype(int)


@dataclass(frozen=True)
class StepPlan:
    """One engine step: its rows and what the hook does with each.

    Batch row ``i`` is ``req_ids[i]`` in vLLM's ``input_batch`` order. Fields:

    * ``layout[i]``: draft slots vLLM scheduled for row i (the rejection sampler's layout,
      placeholders included); ``drafts[i]``: the real ones (0 for a padded row);
    * ``padded_rows``: rows whose drafts are all the scheduler's ``-1`` padding (a request
      admitted with one token left); only their first position has a real context;
    * ``output_lens[i]``: tokens row i output before this step (0: this step samples its
      first output; negative: a partial prefill chunk);
    * ``emitting[i]``: vLLM keeps row i's sample (False for a partial prefill chunk);
    * ``bonus_rows[i]``: the logits row of row i's bonus/plain position, None when nothing
      is verified (the plain sampler's layout, one logits row per request);
      ``first_rows[i]``: the logits row of row i's first sampled position;
    * ``sampled_here``: rows the hook itself samples at their one position (no real
      drafts, emitting); ``plain``: those of them that mix and have a q* from their last
      proposal for that position (sampled from pi at once), the rest from p (padded rows
      of ``base``);
    * ``corrected``: mixing rows of ``sampled_here`` whose position no proposal has seen
      yet (the first output after the prompt): sampled from p here, then corrected to a
      sample of pi once the drafter's first forward of this step gives q* there
      (``first_token``);
    * ``wants_logprobs``: whether any row asked for logprobs under pi.
    """

    req_ids: tuple[str, ...]
    rows: tuple[RowAlignment | None, ...]
    layout: tuple[int, ...]
    drafts: tuple[int, ...]
    padded_rows: frozenset[int]
    output_lens: tuple[int, ...]
    emitting: tuple[bool, ...]
    bonus_rows: tuple[int, ...] | None
    first_rows: tuple[int, ...]
    corrected: tuple[int, ...]
    sampled_here: tuple[int, ...]
    plain: tuple[int, ...]
    wants_logprobs: bool

    @classmethod
    def build(cls, rows: Sequence[RowAlignment | None], *,
              num_draft_tokens: Sequence[int] | None = None,
              padded_rows: frozenset[int] = frozenset(),
              output_lens: Sequence[int] | None = None,
              emitting: Sequence[bool] | None = None,
              req_ids: Sequence[str] | None = None) -> StepPlan:
        """The plan of a step over ``rows`` (defaults: no drafts, every row past its first
        output and emitting, request ids ``"0", "1", ...``)."""
        n = len(rows)
        layout = tuple(int(d) for d in num_draft_tokens) if num_draft_tokens else (0,) * n
        if len(layout) != n:
            raise ValueError(f"{len(layout)} draft counts for {n} rows")
        drafts = tuple(0 if i in padded_rows else d for i, d in enumerate(layout))
        output_lens = tuple(int(x) for x in output_lens) if output_lens is not None \
            else (1,) * n
        emitting = tuple(bool(e) for e in emitting) if emitting is not None else (True,) * n
        bonus_rows = None
        first_rows = tuple(range(n))
        if sum(layout):
            bonus = np.cumsum(layout) + np.arange(n)
            bonus_rows = tuple(int(b) for b in bonus)
            first_rows = tuple(int(b) - d for b, d in zip(bonus, layout))
        sampled_here = tuple(i for i, row in enumerate(rows) if row is not None
                             and drafts[i] == 0 and emitting[i])
        corrected = tuple(i for i in sampled_here
                          if rows[i].mixes and output_lens[i] == 0)
        return cls(
            req_ids=tuple(req_ids) if req_ids is not None else tuple(map(str, range(n))),
            rows=tuple(rows), layout=layout, drafts=drafts,
            padded_rows=frozenset(padded_rows), output_lens=output_lens, emitting=emitting,
            bonus_rows=bonus_rows, first_rows=first_rows, corrected=corrected,
            sampled_here=sampled_here,
            plain=tuple(i for i in sampled_here if rows[i].mixes and i not in corrected),
            wants_logprobs=any(row is not None and row.wants_logprobs_under_pi
                               for row in rows),
        )

    @property
    def num_reqs(self) -> int:
        return len(self.rows)

    @property
    def verifies(self) -> bool:
        """Whether vLLM's rejection sampler runs this step (some row has draft slots)."""
        return self.bonus_rows is not None

    @property
    def num_tokens(self) -> int:
        """Draft positions of the step (rows of the verification's target)."""
        return sum(self.layout)

    def offsets(self) -> np.ndarray:
        """``[num_reqs + 1]`` start of each row's draft positions."""
        return draft_offsets(self.layout)

    def owners(self) -> np.ndarray:
        """``[num_tokens]`` the batch row of each draft position."""
        return np.repeat(np.arange(self.num_reqs), self.layout)
