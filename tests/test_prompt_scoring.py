"""Prompt scoring's pieces on hand-made tensors: the drafter hidden states a capture keeps,
and log pi per prompt position from both models' logits (``server.engine.prompt_scoring``).
The engine-level exactness (every rule, every position, chunked, cached, concurrent) is in
``tests/test_logprobs.py`` and ``tests/test_engine_production.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kad_kernels import mix
from server.engine import prompt_scoring
from server.engine.prompt_scoring import HiddenStateCapture, score_positions
from server.engine.step_plan import RowAlignment

HIDDEN, VOCAB = 8, 12


def test_a_capture_keeps_each_scoring_rows_target_positions_of_the_first_forward():
    """vLLM's drafter layout: each request's target tokens, then one appended slot (the
    next token). Rows 0 and 2 score; row 1 (a decode row with drafts) does not."""
    capture = HiddenStateCapture({0: "a", 2: "c"})
    capture.take(torch.zeros(3, HIDDEN))  # before the layout is known: ignored
    assert not capture.done and capture.hidden == {}
    capture.set_layout(np.array([0, 4, 7, 13]), appended_slots=1)
    capture.set_layout(np.array([0, 1, 2, 3]), appended_slots=0)  # the first layout stays
    output = torch.arange(13, dtype=torch.float32).unsqueeze(-1).repeat(1, HIDDEN)
    capture.take(output)
    capture.take(output + 100)  # a later draft forward of the same proposal: ignored
    assert capture.hidden["a"][:, 0].tolist() == [0, 1, 2]
    assert capture.hidden["c"][:, 0].tolist() == [7, 8, 9, 10, 11]
    assert set(capture.hidden) == {"a", "c"}
    output.zero_()  # the drafter's next forward overwrites its output buffer
    assert capture.hidden["c"][:, 0].tolist() == [7, 8, 9, 10, 11]  # kept copies


@pytest.mark.parametrize("rule,param", [("kad_dual", 0.4), ("confidence_bet", 0.2),
                                        ("kad_primal", 0.9), ("aligned", None)])
def test_scored_positions_are_log_pi_of_both_models_logits_in_row_chunks(rule, param,
                                                                          monkeypatch):
    generator = torch.Generator().manual_seed(5)
    n = 11
    target_hidden = torch.randn(n, HIDDEN, generator=generator)
    draft_hidden = torch.randn(n + 2, HIDDEN, generator=generator)  # may hold more rows
    target_head = torch.randn(HIDDEN, VOCAB, generator=generator)
    draft_head = torch.randn(HIDDEN, VOCAB, generator=generator)
    tokens = torch.randint(0, VOCAB, (n,), generator=generator)
    row = RowAlignment("r", rule, param)
    monkeypatch.setattr(prompt_scoring, "SCORE_ROWS_PER_CHUNK", 4)
    ids, values, ranks = score_positions(
        target_hidden, draft_hidden, lambda h: h @ target_head, lambda h: h @ draft_head,
        row, tokens, num_logprobs=3)
    assert ids.shape == (n, 4) and values.shape == (n, 4) and ranks.shape == (n,)
    for j in range(n):
        p = torch.softmax(target_hidden[j] @ target_head, -1)
        q = torch.softmax(draft_hidden[j] @ draft_head, -1)
        log_pi = mix(p.double(), q.double(), rule, param).log()
        assert int(ids[j, 0]) == int(tokens[j])
        assert abs(float(values[j, 0]) - float(log_pi[tokens[j]])) < 1e-4
        top = torch.topk(log_pi, 3)
        assert torch.allclose(values[j, 1:].double(), top.values.double(), atol=1e-4)
        assert int(ranks[j]) == int((log_pi >= log_pi[tokens[j]] - 1e-9).sum())


def test_fewer_draft_positions_than_target_ones_is_an_error():
    with pytest.raises(ValueError, match="2 draft positions for 3"):
        score_positions(torch.zeros(3, HIDDEN), torch.zeros(2, HIDDEN), lambda h: h,
                        lambda h: h, RowAlignment("r", "aligned"), torch.zeros(3).long(), 0)
