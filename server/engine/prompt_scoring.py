"""Prompt scoring at prefill speed: log pi of every prompt token from one prefill of each
model (no vLLM import here; ``vllm_patches`` wires it into vLLM's prompt logprobs).

A scoring request reaches vLLM with its whole prompt and ``prompt_logprobs`` set, so vLLM
prefills it in both models like any prompt (and reads no prefix cache for it: vLLM's own
rule for prompt logprobs, ``SamplingParams.skip_reading_prefix_cache``). In each engine
step the target's hidden states of the prompt chunk are what vLLM's
``_get_prompt_logprobs_dict`` turns into log p; the drafter's first forward of the step's
proposal runs over the same chunk, and ``HiddenStateCapture`` keeps the scoring rows'
hidden states of that forward (hidden states, ``[chunk, H]``, not ``[chunk, V]`` logits)
until the bookkeeping that follows in the same step. There ``score_positions`` computes
both models' logits in row chunks and mixes them per position with the request's rule at
temperature 1 (the unscaled distributions, what logprobs report everywhere), so position
``j`` of the prompt gets log pi(prompt[j] | prompt[:j]) for every ``j >= 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from server.engine.step_plan import RowAlignment
from server.engine.verification_hook import gather_logprobs, log_pi_of

# Positions scored at once: bounds the ``[rows, V]`` temporaries of one mixing (both
# models' logits, q* and pi) whatever the chunk the scheduler gave the prompt.
SCORE_ROWS_PER_CHUNK = 256


@dataclass
class HiddenStateCapture:
    """The scoring rows' hidden states of the drafter's first forward in one proposal, and
    the hidden state at one position of each row in ``points``.

    ``rows`` maps the batch index of each scoring row (vLLM's ``input_batch`` order, the
    drafter's batch order) to its request id. ``set_layout`` takes the drafter's own
    ``query_start_loc`` of that forward (from ``set_inputs_first_pass``) and the slots it
    appends to every request (the next token); ``take`` then keeps, per scoring row, the
    hidden states at its target tokens, which are the first of its drafter slots.
    """

    rows: Mapping[int, str]
    # Batch index -> how many of its target tokens come after the one whose hidden state
    # is kept alone (a corrected first token's context: ``first_token``).
    points: Mapping[int, int] = field(default_factory=dict)
    layout: np.ndarray | None = None
    appended_slots: int = 0
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)
    at_points: dict[int, torch.Tensor] = field(default_factory=dict)
    done: bool = False

    def set_layout(self, query_start_loc: np.ndarray, appended_slots: int) -> None:
        if self.layout is None:
            self.layout = np.asarray(query_start_loc, dtype=np.int64)
            self.appended_slots = int(appended_slots)

    def take(self, hidden_states: torch.Tensor) -> None:
        """Keep the scoring rows' slices of the first forward's output (later forwards of
        the same proposal are draft steps: ignored)."""
        if self.done or self.layout is None:
            return
        self.done = True
        for index, request_id in self.rows.items():
            start = int(self.layout[index])
            end = int(self.layout[index + 1]) - self.appended_slots
            self.hidden[request_id] = hidden_states[start:end].clone()
        for index, after in self.points.items():
            end = int(self.layout[index + 1]) - self.appended_slots - after
            self.at_points[index] = hidden_states[end - 1].clone()


def score_positions(
    target_hidden: torch.Tensor,
    draft_hidden: torch.Tensor,
    target_logits_of: Callable[[torch.Tensor], torch.Tensor],
    draft_logits_of: Callable[[torch.Tensor], torch.Tensor],
    row: RowAlignment,
    tokens: torch.Tensor,
    num_logprobs: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids [n, k+1], logprobs [n, k+1], ranks [n])`` of pi at ``n`` prompt positions:
    position ``j`` holds both models' hidden states after the prompt's tokens up to ``j``,
    and ``tokens[j]`` is the prompt's next token (column 0 of each row; then the top
    ``num_logprobs`` of pi). Computed ``SCORE_ROWS_PER_CHUNK`` positions at a time."""
    n = target_hidden.shape[0]
    if draft_hidden.shape[0] < n:
        raise ValueError(f"{draft_hidden.shape[0]} draft positions for {n} target ones")
    parts = []
    owners = np.zeros(min(n, SCORE_ROWS_PER_CHUNK), dtype=np.int64)
    for start in range(0, n, SCORE_ROWS_PER_CHUNK):
        stop = min(n, start + SCORE_ROWS_PER_CHUNK)
        target = target_logits_of(target_hidden[start:stop]).float()
        q = draft_logits_of(draft_hidden[start:stop]).float().softmax(dim=-1)
        log_pi = log_pi_of(target, q, [row], owners[:stop - start])
        parts.append(gather_logprobs(log_pi, num_logprobs, tokens[start:stop]))
    return tuple(torch.cat(values) for values in zip(*parts))  # type: ignore[return-value]
