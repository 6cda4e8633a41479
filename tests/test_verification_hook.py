"""The hook's tensor logic without vLLM: pi in the target logits, token fix-ups, stats."""

from __future__ import annotations

import torch

from kad_kernels import mix, mixture_stats
from server.engine.verification_hook import (
    PLACEHOLDER,
    RowAlignment,
    StepState,
    finalize_step,
    mix_target_logits,
)

VOCAB = 12


def _probs(generator: torch.Generator, rows: int) -> torch.Tensor:
    return torch.softmax(3 * torch.randn(rows, VOCAB, generator=generator), dim=-1)


def _row(rule: str, param: float | None = None, **kw) -> RowAlignment:
    return RowAlignment(request_id=f"r-{rule}", rule=rule, param=param, **kw)


def test_from_extra_args_reads_settings_and_ignores_other_requests():
    row = RowAlignment.from_extra_args(
        {"kad": {"id": "a", "rule": "kad_dual", "param": 0.4, "greedy": True, "first_token": 7}}
    )
    assert row == RowAlignment("a", "kad_dual", 0.4, True, 7)
    assert RowAlignment.from_extra_args(None) is None
    assert RowAlignment.from_extra_args({"other": 1}) is None


def test_target_logits_become_pi_per_row_and_rule():
    gen = torch.Generator().manual_seed(0)
    num_drafts = [2, 3, 1, 2]
    rows = [_row("kad_dual", 0.4), _row("base"), None, _row("nudging", 0.7)]
    tokens = sum(num_drafts)
    logits = torch.randn(tokens, VOCAB, generator=gen) * 2
    q_star = _probs(gen, tokens)
    state = StepState(rows=rows)
    out = mix_target_logits(logits.clone(), q_star, num_drafts, state)
    owners = [0, 0, 1, 1, 1, 2, 3, 3]
    for t, owner in enumerate(owners):
        p = torch.softmax(logits[t], -1)
        row = rows[owner]
        if row is None or row.rule == "base":
            assert torch.equal(out[t], logits[t])
            assert state.alpha[t] == 0
        else:
            expected = mix(p, q_star[t], row.rule, row.param)
            torch.testing.assert_close(torch.softmax(out[t], -1), expected, atol=1e-6, rtol=1e-5)
            alpha = mixture_stats(p, q_star[t], row.rule, row.param).alpha
            torch.testing.assert_close(state.alpha[t], alpha)
    assert float(state.alpha.sum()) > 0  # the random rows do defer something


def test_greedy_rows_target_the_argmax_of_pi_not_p():
    # p prefers token 0; q* puts its mass on token 3 and everything of p is deferred.
    logits = torch.tensor([[5.0, 4.9] + [0.0] * (VOCAB - 2)])
    q_star = torch.zeros(1, VOCAB)
    q_star[0, 3] = 1.0
    state = StepState(rows=[_row("aligned", greedy=True)])
    out = mix_target_logits(logits, q_star, [1], state)
    assert int(out[0].argmax()) == 3
    assert torch.isinf(out[0, 0]) and out[0, 0] < 0  # one-hot target: p's argmax impossible


def test_no_draft_probs_leaves_logits_and_flags_rows():
    logits = torch.randn(2, VOCAB)
    state = StepState(rows=[_row("kad_dual", 0.4)])
    out = mix_target_logits(logits.clone(), None, [2], state)
    assert torch.equal(out, logits)
    assert state.inexact_rows == {0}


def _sampled(rows: list[list[int]], width: int) -> torch.Tensor:
    return torch.tensor([r + [PLACEHOLDER] * (width - len(r)) for r in rows], dtype=torch.int32)


def test_finalize_drops_bonus_for_mixing_rows_and_keeps_it_for_base():
    rows = [_row("kad_dual", 0.4), _row("base"), _row("kad_dual", 0.4)]
    state = StepState(rows=rows, num_draft_tokens=[3, 3, 3])
    state.alpha = torch.tensor([0.5, 0.0, 0.25, 0, 0, 0, 0.1, 0.2, 0.3])
    # row 0: all 3 accepted + bonus; row 1: all accepted + bonus; row 2: rejected at 2nd.
    sampled = _sampled([[4, 5, 6, 9], [1, 2, 3, 8], [7, 11]], 4)
    stats = finalize_step(sampled, torch.zeros(9 + 3, VOCAB), [3, 7, 11], [False] * 3, [True] * 3, state)
    assert sampled[0].tolist() == [4, 5, 6, PLACEHOLDER]
    assert sampled[1].tolist() == [1, 2, 3, 8]
    assert sampled[2].tolist() == [7, 11, PLACEHOLDER, PLACEHOLDER]
    by_id = {(s.request_id, i): s for i, s in enumerate(stats)}
    s0, s1, s2 = (by_id[(rows[i].request_id, i)] for i in range(3))
    assert (s0.drafted, s0.accepted, s0.emitted, s0.positions) == (3, 3, 3, 3)
    assert abs(s0.alpha_sum - 0.75) < 1e-6 and s0.deferred_positions == 2
    assert (s1.drafted, s1.accepted, s1.emitted) == (3, 3, 4)
    assert (s2.drafted, s2.accepted, s2.emitted, s2.positions) == (3, 1, 2, 2)
    assert abs(s2.alpha_sum - 0.3) < 1e-6


def test_finalize_forces_the_withheld_prompt_token_on_the_first_step():
    rows = [_row("kad_dual", 0.4, first_token=42), _row("kad_dual", 0.4, first_token=43), None]
    state = StepState(rows=rows, num_draft_tokens=[0, 0, 0])
    sampled = torch.tensor([[5], [6], [7]], dtype=torch.int32)
    stats = finalize_step(sampled, torch.zeros(3, VOCAB), None, [True, False, True], [True] * 3, state)
    assert sampled[:, 0].tolist() == [42, 6, 7]
    # The forced token is not generated output; the unforced row-1 token came from p.
    assert [(s.request_id, s.emitted, s.inexact) for s in stats] == [("r-kad_dual", 1, 1)]


def test_finalize_greedy_plain_rows_take_the_argmax():
    logits = torch.zeros(2, VOCAB)
    logits[0, 9] = 3.0
    logits[1, 2] = 3.0
    rows = [_row("base", greedy=True), _row("base", greedy=True)]
    state = StepState(rows=rows, num_draft_tokens=[0, 0])
    sampled = torch.tensor([[1], [1]], dtype=torch.int32)
    finalize_step(sampled, logits, None, [False, False], [True, True], state)
    assert sampled[:, 0].tolist() == [9, 2]


def test_placeholder_rows_keep_p_and_are_flagged_while_other_rows_mix():
    p_logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(11))
    q_star = torch.softmax(torch.randn(4, 6, generator=torch.Generator().manual_seed(12)), -1)
    q_star[2:] = 0.0  # row 1's positions: placeholder drafts, no q*
    rows = [RowAlignment("a", "aligned"), RowAlignment("b", "aligned")]
    state = StepState(rows=rows, placeholder_rows={1})
    out = mix_target_logits(p_logits.clone(), q_star, [2, 2], state)
    assert torch.allclose(torch.softmax(out[:2], -1), q_star[:2], atol=1e-6)  # pi = q*
    assert torch.equal(out[2:], p_logits[2:])
    assert state.inexact_rows == {1}


def test_a_non_finite_row_degrades_alone():
    """A NaN in one draft row or one target row never raises: that row is verified against
    p (or uniform when p itself is NaN), counted; the other rows still get pi."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, VOCAB, generator=gen)
    q_star = _probs(gen, 4)
    q_star[1, 2] = float("nan")
    logits[3, 0] = float("nan")
    rows = [_row("kad_dual", 0.4)]
    state = StepState(rows=rows, num_draft_tokens=[4])
    out = mix_target_logits(logits.clone(), q_star, [4], state)
    assert state.degraded.tolist() == [False, True, False, True]
    expected = mix(torch.softmax(logits[0], -1), q_star[0], "kad_dual", 0.4)
    torch.testing.assert_close(torch.softmax(out[0], -1), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.softmax(out[1], -1), torch.softmax(logits[1], -1))
    assert torch.isfinite(out).all()
    sampled = _sampled([[1, 2, 3, 4, 5]], 5)
    stats = finalize_step(sampled, torch.zeros(5, VOCAB), [4], [False], [True], state)
    assert stats[0].degraded == 2


def test_zero_draft_rows_are_sampled_from_pi_not_p():
    """Drafts cut to zero: the hook samples the row from pi with the stored q*."""
    from server.engine.verification_hook import resample_plain_rows

    # p puts everything on token 0; q* on token 5; rule aligned: pi = q*.
    target = torch.zeros(2, VOCAB)
    target[:, 0] = 1.0
    q_star = torch.zeros(2, VOCAB)
    q_star[:, 5] = 1.0
    rows = [_row("aligned"), _row("base"), _row("aligned", greedy=True)]
    state = StepState(rows=rows, num_draft_tokens=[0, 0, 0])
    sampled = torch.tensor([[0], [0], [0]], dtype=torch.int32)
    resample_plain_rows(sampled, target, q_star, [0, 2], {}, state)
    assert sampled[:, 0].tolist() == [5, 0, 5]
    stats = finalize_step(sampled, torch.zeros(3, VOCAB), None, [False] * 3, [True] * 3, state)
    assert [s.inexact for s in stats] == [0, 0, 0]


def test_zero_draft_pi_sampling_is_distributed_as_pi():
    from server.engine.verification_hook import resample_plain_rows

    gen = torch.Generator().manual_seed(5)
    p = torch.softmax(0.7 * torch.randn(1, VOCAB, generator=gen), -1)  # flat: mostly deferred
    q_star = _probs(gen, 1)
    n = 20000
    rows = [_row("kad_dual", 0.3)] * n
    state = StepState(rows=rows, num_draft_tokens=[0] * n)
    sampled = torch.zeros(n, 1, dtype=torch.int32)
    torch.manual_seed(0)
    resample_plain_rows(sampled, p.expand(n, -1), q_star.expand(n, -1), list(range(n)), {}, state)
    counts = torch.bincount(sampled[:, 0].long(), minlength=VOCAB).double() / n
    pi = mix(p[0], q_star[0], "kad_dual", 0.3).double()
    assert 0.5 * float((counts - pi).abs().sum()) < 0.02
    assert 0.5 * float((pi - p[0].double()).abs().sum()) > 0.1  # pi differs from p here
    assert 0.5 * float((counts - p[0].double()).abs().sum()) > 0.05


def test_partial_prefill_rows_emit_nothing_and_count_nothing():
    rows = [_row("kad_dual", 0.4)]
    state = StepState(rows=rows, num_draft_tokens=[0])
    sampled = torch.tensor([[3]], dtype=torch.int32)
    stats = finalize_step(sampled, torch.zeros(1, VOCAB), None, [False], [False], state)
    assert stats == []


def test_a_padded_first_step_emits_the_withheld_token_alone():
    """A request admitted with one token to compute joins a running batch with ``-1``
    padding drafts; vLLM's CPU kernel can accept a ``-1`` and then sample slot 1 after a
    placeholder context (seen as a scored prompt whose token 2 was a sample, and every
    value after it wrong). The first step emits the withheld token and nothing else."""
    rows = [_row("kad_dual", 0.4, first_token=42), _row("kad_dual", 0.4)]
    state = StepState(rows=rows, num_draft_tokens=[3, 2], padded_rows=frozenset({0}))
    sampled = _sampled([[PLACEHOLDER, 13], [4, 5, 6]], 4)
    stats = finalize_step(sampled, torch.zeros(3 + 2 + 2, VOCAB), [3, 6], [True, False],
                          [True, True], state)
    assert sampled[0].tolist() == [42, PLACEHOLDER, PLACEHOLDER, PLACEHOLDER]
    assert [(s.request_id, s.drafted, s.emitted) for s in stats] == [("r-kad_dual", 2, 2)]


def test_a_padded_row_keeps_its_first_position_only_and_counts_no_drafts():
    """A padded row later in its life (resumed with one token left): one token, sampled at
    its first position; its placeholder 'drafts' are not counted as drafted or accepted."""
    rows = [_row("base")]
    state = StepState(rows=rows, num_draft_tokens=[3], padded_rows=frozenset({0}))
    sampled = _sampled([[7, 13, 2]], 4)
    stats = finalize_step(sampled, torch.zeros(4, VOCAB), [3], [False], [True], state)
    assert sampled[0].tolist() == [7, PLACEHOLDER, PLACEHOLDER, PLACEHOLDER]
    assert [(s.drafted, s.accepted, s.emitted, s.positions) for s in stats] == [(0, 0, 1, 0)]


def test_a_greedy_padded_row_takes_the_argmax_at_its_first_position():
    rows = [_row("kad_dual", 0.4, greedy=True)]
    state = StepState(rows=rows, num_draft_tokens=[2], padded_rows=frozenset({0}))
    logits = torch.zeros(3, VOCAB)
    logits[0, 5] = 9.0  # first position: where the row's token is sampled
    logits[2, 7] = 9.0  # the bonus position, after two placeholders
    sampled = _sampled([[1, 2]], 3)
    finalize_step(sampled, logits, [2], [False], [True], state)
    assert sampled[0].tolist() == [5, PLACEHOLDER, PLACEHOLDER]


def test_rule_groups_follow_rule_order_skip_unmixed_and_chunk():
    from server.engine.verification_hook import rule_groups

    groups = list(rule_groups(["kad_dual", "", "aligned", "kad_dual", "kad_dual"], chunk=2))
    assert [(rule, positions.tolist()) for rule, positions in groups] == [
        ("aligned", [2]), ("kad_dual", [0, 3]), ("kad_dual", [4])]
    assert [(r, p.tolist()) for r, p in rule_groups(["base"] * 3)] == [("base", [0, 1, 2])]
    assert list(rule_groups(["", ""])) == []
