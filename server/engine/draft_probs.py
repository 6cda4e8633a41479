"""Each request's draft probabilities q*, kept until its drafts are verified.

vLLM's model runner keeps only the *latest* proposal's draft probabilities, keyed by the
batch of that proposal. A running request that the scheduler leaves out of one step (token
budget taken by prefills, for instance) is verified a step later with drafts from an
older proposal; upstream then finds no probabilities for it and verifies the whole batch
without q*, so no row of that step could be checked against the mixture pi. This store
keeps each request's q* from the proposal that produced its drafts, so verification finds
them whatever happened in between. Plain tensor code; ``vllm_patches`` wires it in.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch

logger = logging.getLogger(__name__)


class DraftProbStore:
    """request id -> q* rows ``[num_speculative_tokens, V]`` of its pending drafts."""

    def __init__(self) -> None:
        self._rows: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, req_ids: Sequence[str], probs: torch.Tensor | None) -> None:
        """After a proposal: row i of ``probs`` ``[B, G, V]`` belongs to ``req_ids[i]``.

        ``probs`` None (a proposal without probabilities) forgets those requests, so an
        older q* can never be paired with newer drafts.
        """
        for row, req_id in enumerate(req_ids):
            if probs is None or row >= probs.shape[0]:
                self._rows.pop(req_id, None)
            else:
                self._rows[req_id] = probs[row]  # a view: proposals allocate fresh tensors

    def take(
        self,
        req_ids: Sequence[str],
        num_draft_tokens: Sequence[int],
        draft_token_ids: torch.Tensor | Sequence[int],
    ) -> tuple[torch.Tensor | None, set[int]]:
        """q* for this verification, ``[sum(num_draft_tokens), V]`` request-major.

        Returns the probabilities and the batch rows that drafted only placeholders:
        vLLM pads a request admitted with one token left to compute (a prefix-cache hit)
        with ``-1`` drafts that verification always rejects. Such a row never had a
        proposal; it gets zero rows here, so the token vLLM samples there comes from the
        target alone (and the caller knows it has no q*). The rows are consumed (verified
        drafts are replaced by the next proposal). None when nothing drafted, or when a
        request with real drafts has no probabilities (vLLM then verifies without q*).
        """
        found: list[torch.Tensor | None] = []
        placeholders: set[int] = set()
        missing = []
        offset = 0
        for row, (req_id, count) in enumerate(zip(req_ids, num_draft_tokens)):
            if count == 0:
                continue
            probs = self._rows.pop(req_id, None)
            if probs is not None and probs.shape[0] >= count:
                found.append(probs[:count])
            elif all(int(t) < 0 for t in draft_token_ids[offset: offset + count]):
                found.append(None)
                placeholders.add(row)
            else:
                missing.append(req_id)
            offset += count
        template = next((f for f in found if f is not None), None)
        if missing or template is None:
            if missing:
                logger.warning("no draft probabilities for %s: verified without q*", missing)
            return None, placeholders
        parts = [f if f is not None else template.new_zeros(n, template.shape[-1])
                 for f, n in zip(found, [n for n in num_draft_tokens if n])]
        return torch.cat(parts, dim=0).contiguous(), placeholders

    def keep_only(self, live_req_ids: Iterable[str]) -> None:
        """Forget finished or aborted requests (their drafts will never be verified)."""
        live = set(live_req_ids)
        for req_id in [r for r in self._rows if r not in live]:
            del self._rows[req_id]
