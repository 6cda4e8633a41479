"""Each request's draft probabilities q*, kept until the positions they describe are sampled.

vLLM's model runner keeps only the *latest* proposal's draft probabilities, keyed by the
batch of that proposal. A running request that the scheduler leaves out of a step, or
whose drafts the token budget cuts to zero, or that is preempted and recomputed, is
sampled later at a position whose q* came from an older proposal; upstream then verifies
the whole batch without q* (or samples that row from p alone). This store keeps each
request's q* from the proposal that made its drafts:

* rows of a verification step take the q* of their drafts (``take``);
* a row sampled with no drafts takes q* of its first draft position, which is exactly the
  position being sampled: between a proposal and the next token a request emits, its
  context does not change (``take_first_rows``);
* rows of one proposal are views of one batch tensor; a request that falls out of the
  batch gets its rows copied out, so an old batch tensor is never kept alive by
  stragglers (the store holds at most one proposal's worth of memory besides the
  current proposal).

Plain tensor code; ``vllm_patches`` wires it in.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Sequence

import torch

logger = logging.getLogger(__name__)


class DraftProbStore:
    """request id -> q* rows ``[num_speculative_tokens, V]`` of its pending drafts."""

    def __init__(self) -> None:
        self._rows: dict[str, torch.Tensor] = {}
        self._current: torch.Tensor | None = None  # the latest proposal's batch tensor

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, req_ids: Sequence[str], probs: torch.Tensor | None,
               emitting: Sequence[bool] | None = None) -> None:
        """After a proposal: row i of ``probs`` ``[B, G, V]`` belongs to ``req_ids[i]``.

        ``emitting[i]`` False (a partial prefill chunk: its proposal continues a discarded
        sample) keeps that request's older q*. ``probs`` None (vLLM zeroed the drafts
        instead of proposing) forgets the rows, so an older q* is never paired with them.
        """
        for row, req_id in enumerate(req_ids):
            if emitting is not None and row < len(emitting) and not emitting[row]:
                continue
            if probs is None or row >= probs.shape[0]:
                self._rows.pop(req_id, None)
            else:
                self._rows[req_id] = probs[row]
        self._current = probs
        self._compact()

    def _compact(self) -> None:
        """Copy out the rows that still view an older proposal's batch tensor."""
        current = None if self._current is None else self._current.untyped_storage().data_ptr()
        for req_id, rows in self._rows.items():
            if rows._base is not None and rows.untyped_storage().data_ptr() != current:
                self._rows[req_id] = rows.clone()

    def take(
        self,
        req_ids: Sequence[str],
        num_draft_tokens: Sequence[int],
        keep: Collection[int] = (),
    ) -> tuple[torch.Tensor | None, set[int]]:
        """q* for this verification, ``[sum(num_draft_tokens), V]`` request-major.

        Returns the probabilities and the batch rows whose drafts have no q*: placeholder
        drafts (vLLM pads a request admitted with one token left to compute, a prefix-cache
        hit, with ``-1`` drafts) or drafts no proposal made. Those rows get zero q*, which
        vLLM's sampler always rejects, so the token sampled there comes from the target
        alone (the caller counts it); every other row is verified exactly. The rows are
        consumed. None when no row has q*. Rows in ``keep`` (drafts that are the scheduler's
        padding, not this store's) get zero rows and keep their q* for ``take_first_rows``.
        """
        found: list[torch.Tensor | None] = []
        without: set[int] = set()
        for row, (req_id, count) in enumerate(zip(req_ids, num_draft_tokens)):
            if count == 0:
                continue
            probs = None if row in keep else self._rows.pop(req_id, None)
            if probs is not None and probs.shape[0] >= count:
                found.append(probs[:count])
            else:
                found.append(None)
                without.add(row)
        template = next((f for f in found if f is not None), None)
        if template is None:
            return None, without
        counts = [n for n in num_draft_tokens if n]
        parts = [f if f is not None else template.new_zeros(n, template.shape[-1])
                 for f, n in zip(found, counts)]
        return torch.cat(parts, dim=0), without

    def take_first_rows(self, req_ids: Sequence[str]) -> list[torch.Tensor | None]:
        """q* at the next position of each request (its first draft's row), consumed."""
        out: list[torch.Tensor | None] = []
        for req_id in req_ids:
            rows = self._rows.pop(req_id, None)
            out.append(None if rows is None or rows.shape[0] == 0 else rows[0])
        return out

    def keep_only(self, live_req_ids: Iterable[str]) -> None:
        """Forget finished or aborted requests (their drafts will never be verified)."""
        live = set(live_req_ids)
        for req_id in [r for r in self._rows if r not in live]:
            del self._rows[req_id]
