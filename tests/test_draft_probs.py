"""Per-request draft probabilities: each request's own q*, whatever the scheduler did."""

from __future__ import annotations

import torch

from server.engine.draft_probs import DraftProbStore

G, V = 3, 7


def _probs(batch: int, seed: int) -> torch.Tensor:
    return torch.softmax(torch.randn(batch, G, V, generator=torch.Generator().manual_seed(seed)), -1)


def test_rows_follow_their_request_in_request_major_order():
    store = DraftProbStore()
    probs = _probs(3, 0)
    store.record(["a", "b", "c"], probs)
    out, placeholders = store.take(["c", "a", "b"], [2, 0, 3])
    assert torch.equal(out, torch.cat([probs[2, :2], probs[1, :3]])) and not placeholders
    assert len(store) == 1  # "a" drafted nothing this step: its q* is still pending


def test_a_request_skipped_for_a_step_keeps_the_q_star_of_its_own_drafts():
    store = DraftProbStore()
    first, second = _probs(2, 1), _probs(1, 2)
    store.record(["a", "b"], first)
    # Next step: only "a" scheduled (b left out by the scheduler), new proposal for "a" only.
    assert torch.equal(store.take(["a"], [G])[0], first[0])
    store.record(["a"], second)
    # "b" is back with its drafts from the proposal it was last part of.
    out, _ = store.take(["b", "a"], [G, G])
    assert torch.equal(out, torch.cat([first[1], second[0]]))


def test_placeholder_drafts_get_zero_rows_and_are_reported():
    store = DraftProbStore()
    probs = _probs(1, 3)
    store.record(["a"], probs)
    out, placeholders = store.take(["a", "new"], [G, 2])
    assert placeholders == {1}
    assert torch.equal(out[:G], probs[0]) and torch.equal(out[G:], torch.zeros(2, V))


def test_a_row_without_probabilities_does_not_cost_the_others_their_q_star():
    store = DraftProbStore()
    probs = _probs(1, 4)
    store.record(["a"], probs)
    out, without = store.take(["a", "new"], [G, G])
    assert without == {1}
    assert torch.equal(out[:G], probs[0]) and torch.equal(out[G:], torch.zeros(G, V))
    assert store.take(["a"], [0])[0] is None  # nothing drafted, nothing stored


def test_no_row_with_probabilities_means_none():
    store = DraftProbStore()
    out, without = store.take(["x", "y"], [G, 1])
    assert out is None and without == {0, 1}


def test_a_proposal_without_probabilities_forgets_older_ones():
    store = DraftProbStore()
    store.record(["a", "b"], _probs(2, 5))
    store.record(["a"], None)  # e.g. drafts zeroed: a's older q* must not meet new drafts
    assert store.take(["a"], [G])[0] is None
    assert store.take(["b"], [G])[0] is not None


def test_finished_requests_are_forgotten():
    store = DraftProbStore()
    store.record(["a", "b"], _probs(2, 6))
    store.keep_only(["b"])
    assert len(store) == 1 and store.take(["b"], [1])[0].shape == (1, V)


def test_a_zero_draft_row_takes_q_star_of_its_first_draft_position():
    store = DraftProbStore()
    probs = _probs(2, 7)
    store.record(["a", "b"], probs)
    rows = store.take_first_rows(["b", "missing"])
    assert torch.equal(rows[0], probs[1, 0]) and rows[1] is None
    assert store.take_first_rows(["b"]) == [None]  # consumed


def test_a_partial_prefill_row_keeps_its_older_q_star():
    store = DraftProbStore()
    first, second = _probs(1, 8), _probs(1, 9)
    store.record(["a"], first)
    store.record(["a"], second, emitting=[False])  # a recompute chunk: sample discarded
    assert torch.equal(store.take_first_rows(["a"])[0], first[0, 0])


def test_stragglers_are_copied_out_of_old_batch_tensors():
    store = DraftProbStore()
    first = _probs(2, 10)
    store.record(["a", "b"], first)
    store.record(["a"], _probs(1, 11))  # "b" skipped: must not keep `first` alive
    rows = store._rows["b"]
    assert rows.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
    assert torch.equal(rows, first[1])
