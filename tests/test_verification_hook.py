"""The hook's tensor logic without vLLM: pi in the target logits, token fix-ups, stats.
Every stage runs on a hand-made ``StepPlan`` and hand-made tensors."""

from __future__ import annotations

import torch

from kad_kernels import mix, mixture_stats
from server.engine.verification_hook import (
    PLACEHOLDER,
    Mixed,
    RowAlignment,
    StepPlan,
    finalize_step,
    mix_target_logits,
    resample_plain_rows,
)

VOCAB = 12


def _probs(generator: torch.Generator, rows: int) -> torch.Tensor:
    return torch.softmax(3 * torch.randn(rows, VOCAB, generator=generator), dim=-1)


def _row(rule: str, param: float | None = None, request_id: str | None = None,
         **kw) -> RowAlignment:
    return RowAlignment(request_id=request_id or f"r-{rule}", rule=rule, param=param, **kw)


def _plan(rows, drafts=None, *, first=None, emitting=None, padded=frozenset()) -> StepPlan:
    """A step over ``rows``; ``first[i]``: this step samples row i's first output."""
    return StepPlan.build(rows, num_draft_tokens=drafts, padded_rows=padded,
                          output_lens=None if first is None else [0 if f else 5 for f in first],
                          emitting=emitting)


def _mixed(alpha: list[float]) -> Mixed:
    return Mixed(None, torch.tensor(alpha), torch.zeros(len(alpha), dtype=torch.bool))


def test_from_extra_args_reads_settings_and_ignores_other_requests():
    row = RowAlignment.from_extra_args(
        {"kad": {"id": "a", "rule": "kad_dual", "param": 0.4, "greedy": True, "logprobs": 7}}
    )
    assert row == RowAlignment("a", "kad_dual", 0.4, True, 7)
    assert RowAlignment.from_extra_args(None) is None
    assert RowAlignment.from_extra_args({"other": 1}) is None


def test_the_plan_lays_out_rows_positions_and_what_the_hook_samples():
    """One plan from vLLM's host data: bonus and first logits rows from the draft layout
    (as ``SpecDecodeMetadata.bonus_logits_indices``), real drafts net of padding, the
    rows sampled before any proposal saw their context (corrected to pi by the proposal),
    and which rows the hook samples itself (from pi or from p)."""
    rows = [_row("kad_dual", 0.4), _row("base", logprobs=2), None,
            _row("aligned"), _row("kad_dual", 0.4),
            _row("kad_dual", 0.4), _row("aligned", logprobs=0)]
    plan = StepPlan.build(rows, num_draft_tokens=[3, 2, 0, 0, 2, 0, 1],
                          padded_rows=frozenset({4}), output_lens=[4, 7, 2, 0, 1, -3, 2],
                          emitting=[True, True, True, True, True, False, True],
                          req_ids=list("abcdefg"))
    assert plan.verifies and plan.num_tokens == 8
    # vLLM's bonus_logits_indices for this layout: cumsum(drafts) + arange
    assert plan.bonus_rows == (3, 6, 7, 8, 11, 12, 14)
    assert plan.first_rows == (0, 4, 7, 8, 9, 12, 13)
    assert plan.drafts == (3, 2, 0, 0, 0, 0, 1)  # row 4's drafts are padding
    # Row 2 is not kad's, 3 samples its first output, 5 is a partial prefill chunk.
    assert plan.sampled_here == (3, 4) and plan.corrected == (3,) and plan.plain == (4,)
    assert plan.wants_logprobs
    assert plan.owners().tolist() == [0, 0, 0, 1, 1, 4, 4, 6]
    assert plan.offsets().tolist() == [0, 3, 5, 5, 5, 7, 7, 8]
    assert plan.req_ids[4] == "e"
    quiet = StepPlan.build([_row("base"), None])
    assert not quiet.verifies and quiet.bonus_rows is None and quiet.first_rows == (0, 1)
    assert quiet.plain == () and quiet.sampled_here == (0,)
    assert not quiet.wants_logprobs


def test_target_logits_become_pi_per_row_and_rule():
    gen = torch.Generator().manual_seed(0)
    num_drafts = [2, 3, 1, 2]
    rows = [_row("kad_dual", 0.4), _row("base"), None, _row("nudging", 0.7)]
    tokens = sum(num_drafts)
    logits = torch.randn(tokens, VOCAB, generator=gen) * 2
    q_star = _probs(gen, tokens)
    out = logits.clone()
    mixed = mix_target_logits(out, q_star, _plan(rows, num_drafts))
    owners = [0, 0, 1, 1, 1, 2, 3, 3]
    for t, owner in enumerate(owners):
        p = torch.softmax(logits[t], -1)
        row = rows[owner]
        if row is None or row.rule == "base":
            assert torch.equal(out[t], logits[t])
            assert mixed.alpha[t] == 0
        else:
            expected = mix(p, q_star[t], row.rule, row.param)
            torch.testing.assert_close(torch.softmax(out[t], -1), expected, atol=1e-6, rtol=1e-5)
            alpha = mixture_stats(p, q_star[t], row.rule, row.param).alpha
            torch.testing.assert_close(mixed.alpha[t], alpha)
    assert float(mixed.alpha.sum()) > 0  # the random rows do defer something
    assert mixed.draft_probs is q_star and mixed.inexact_rows == frozenset()


def test_tokens_a_grammar_forbids_get_no_mass_in_pi_even_where_q_star_has_it():
    """vLLM masks p's logits (-inf); mixing can move q*'s mass back onto a masked token,
    so pi is masked after mixing and renormalised over the allowed tokens; a greedy row
    takes the argmax of that masked pi (here q*'s favourite is forbidden)."""
    gen = torch.Generator().manual_seed(3)
    rows = [_row("kad_dual", 0.4), _row("aligned", greedy=True)]
    logits = torch.randn(2, VOCAB, generator=gen)
    forbidden = torch.zeros(2, VOCAB, dtype=torch.bool)
    forbidden[:, :4] = True
    logits.masked_fill_(forbidden, float("-inf"))
    q_star = _probs(gen, 2)
    q_star[:, 1] += 5.0  # q* prefers a forbidden token
    q_star /= q_star.sum(-1, keepdim=True)
    out = logits.clone()
    mix_target_logits(out, q_star, _plan(rows, [1, 1]), forbidden=forbidden)
    pi = torch.softmax(out, -1)
    assert float(pi[:, :4].sum()) == 0.0
    expected = mix(torch.softmax(logits[0], -1), q_star[0], "kad_dual", 0.4) * ~forbidden[0]
    torch.testing.assert_close(pi[0], expected / expected.sum(), atol=1e-6, rtol=1e-5)
    allowed_q = q_star[1] * ~forbidden[1]
    assert int(pi[1].argmax()) == int(allowed_q.argmax()) and float(pi[1].max()) == 1.0
    unmasked = logits.clone()
    mix_target_logits(unmasked, q_star, _plan(rows, [1, 1]))
    assert float(torch.softmax(unmasked, -1)[0, :4].sum()) > 0.1  # the mask matters here


def test_greedy_rows_target_the_argmax_of_pi_not_p():
    # p prefers token 0; q* puts its mass on token 3 and everything of p is deferred.
    logits = torch.tensor([[5.0, 4.9] + [0.0] * (VOCAB - 2)])
    q_star = torch.zeros(1, VOCAB)
    q_star[0, 3] = 1.0
    mix_target_logits(logits, q_star, _plan([_row("aligned", greedy=True)], [1]))
    assert int(logits[0].argmax()) == 3
    assert torch.isinf(logits[0, 0]) and logits[0, 0] < 0  # one-hot: p's argmax impossible


def test_no_draft_probs_leaves_logits_and_flags_rows():
    logits = torch.randn(2, VOCAB)
    out = logits.clone()
    mixed = mix_target_logits(out, None, _plan([_row("kad_dual", 0.4)], [2]))
    assert torch.equal(out, logits)
    assert mixed.inexact_rows == {0}


def _sampled(rows: list[list[int]], width: int) -> torch.Tensor:
    return torch.tensor([r + [PLACEHOLDER] * (width - len(r)) for r in rows], dtype=torch.int32)


def test_finalize_drops_bonus_for_mixing_rows_and_keeps_it_for_base():
    rows = [_row("kad_dual", 0.4), _row("base"), _row("kad_dual", 0.4)]
    mixed = _mixed([0.5, 0.0, 0.25, 0, 0, 0, 0.1, 0.2, 0.3])
    # row 0: all 3 accepted + bonus; row 1: all accepted + bonus; row 2: rejected at 2nd.
    sampled = _sampled([[4, 5, 6, 9], [1, 2, 3, 8], [7, 11]], 4)
    done = finalize_step(sampled, torch.zeros(9 + 3, VOCAB), _plan(rows, [3, 3, 3]), mixed)
    assert sampled[0].tolist() == [4, 5, 6, PLACEHOLDER]
    assert sampled[1].tolist() == [1, 2, 3, 8]
    assert sampled[2].tolist() == [7, 11, PLACEHOLDER, PLACEHOLDER]
    s0, s1, s2 = done.stats
    assert (s0.drafted, s0.accepted, s0.emitted, s0.positions) == (3, 3, 3, 3)
    assert abs(s0.alpha_sum - 0.75) < 1e-6 and s0.deferred_positions == 2
    assert (s1.drafted, s1.accepted, s1.emitted) == (3, 3, 4)
    assert (s2.drafted, s2.accepted, s2.emitted, s2.positions) == (3, 1, 2, 2)
    assert abs(s2.alpha_sum - 0.3) < 1e-6


def test_finalize_counts_a_corrected_first_token_as_exact_and_a_plain_one_from_p_not():
    rows = [_row("kad_dual", 0.4, request_id="a"), _row("kad_dual", 0.4, request_id="b"),
            None]
    sampled = torch.tensor([[5], [6], [7]], dtype=torch.int32)
    plan = _plan(rows, first=[True, False, True])
    assert plan.corrected == (0,) and plan.plain == (1,)
    done = finalize_step(sampled, torch.zeros(3, VOCAB), plan, corrected=frozenset({0}))
    assert sampled[:, 0].tolist() == [5, 6, 7]
    # Row 0 is corrected to pi by the proposal; row 1 kept a sample of p (no stored q*).
    assert [(s.request_id, s.emitted, s.inexact) for s in done.stats] == [("a", 1, 0),
                                                                          ("b", 1, 1)]


def test_finalize_greedy_plain_rows_take_the_argmax():
    logits = torch.zeros(2, VOCAB)
    logits[0, 9] = 3.0
    logits[1, 2] = 3.0
    rows = [_row("base", greedy=True), _row("base", greedy=True)]
    sampled = torch.tensor([[1], [1]], dtype=torch.int32)
    finalize_step(sampled, logits, _plan(rows))
    assert sampled[:, 0].tolist() == [9, 2]


def test_placeholder_rows_keep_p_and_are_flagged_while_other_rows_mix():
    p_logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(11))
    q_star = torch.softmax(torch.randn(4, 6, generator=torch.Generator().manual_seed(12)), -1)
    q_star[2:] = 0.0  # row 1's positions: placeholder drafts, no q*
    rows = [RowAlignment("a", "aligned"), RowAlignment("b", "aligned")]
    out = p_logits.clone()
    mixed = mix_target_logits(out, q_star, _plan(rows, [2, 2]), without_q=frozenset({1}))
    assert torch.allclose(torch.softmax(out[:2], -1), q_star[:2], atol=1e-6)  # pi = q*
    assert torch.equal(out[2:], p_logits[2:])
    assert mixed.inexact_rows == {1}


def test_a_non_finite_row_degrades_alone():
    """A NaN in one draft row or one target row never raises: that row is verified against
    p (or uniform when p itself is NaN), counted; the other rows still get pi."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, VOCAB, generator=gen)
    q_star = _probs(gen, 4)
    q_star[1, 2] = float("nan")
    logits[3, 0] = float("nan")
    plan = _plan([_row("kad_dual", 0.4)], [4])
    out = logits.clone()
    mixed = mix_target_logits(out, q_star, plan)
    assert mixed.degraded.tolist() == [False, True, False, True]
    expected = mix(torch.softmax(logits[0], -1), q_star[0], "kad_dual", 0.4)
    torch.testing.assert_close(torch.softmax(out[0], -1), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.softmax(out[1], -1), torch.softmax(logits[1], -1))
    assert torch.isfinite(out).all()
    sampled = _sampled([[1, 2, 3, 4, 5]], 5)
    done = finalize_step(sampled, torch.zeros(5, VOCAB), plan, mixed)
    assert done.stats[0].degraded == 2


def test_zero_draft_rows_are_sampled_from_pi_not_p():
    """Drafts cut to zero: the hook samples the row from pi with the stored q*."""
    # p puts everything on token 0; q* on token 5; rule aligned: pi = q*.
    target = torch.zeros(2, VOCAB)
    target[:, 0] = 1.0
    q_star = torch.zeros(2, VOCAB)
    q_star[:, 5] = 1.0
    rows = [_row("aligned"), _row("base"), _row("aligned", greedy=True)]
    plan = _plan(rows)
    assert plan.plain == (0, 2)
    plain = resample_plain_rows(target, q_star, [0, 2], {}, plan)
    assert plain.rows == (0, 2) and plain.tokens.tolist() == [5, 5]
    assert torch.equal(plain.q_of(2), q_star[1]) and not plain.degraded.any()
    sampled = torch.tensor([[0], [0], [0]], dtype=torch.int32)
    from server.engine.verification_hook import write_first_slots
    write_first_slots(sampled, plain.rows, plain.tokens)
    assert sampled[:, 0].tolist() == [5, 0, 5]
    done = finalize_step(sampled, torch.zeros(3, VOCAB), plan, plain=plain)
    assert [s.inexact for s in done.stats] == [0, 0, 0]
    # The same row not resampled (no stored q*) came from p: counted inexact.
    assert [s.inexact for s in finalize_step(sampled, torch.zeros(3, VOCAB), plan).stats] \
        == [1, 0, 1]


def test_zero_draft_pi_sampling_is_distributed_as_pi():
    gen = torch.Generator().manual_seed(5)
    p = torch.softmax(0.7 * torch.randn(1, VOCAB, generator=gen), -1)  # flat: mostly deferred
    q_star = _probs(gen, 1)
    n = 20000
    rows = [_row("kad_dual", 0.3)] * n
    torch.manual_seed(0)
    plain = resample_plain_rows(p.expand(n, -1), q_star.expand(n, -1), list(range(n)), {},
                                _plan(rows))
    counts = torch.bincount(plain.tokens, minlength=VOCAB).double() / n
    pi = mix(p[0], q_star[0], "kad_dual", 0.3).double()
    assert 0.5 * float((counts - pi).abs().sum()) < 0.02
    assert 0.5 * float((pi - p[0].double()).abs().sum()) > 0.1  # pi differs from p here
    assert 0.5 * float((counts - p[0].double()).abs().sum()) > 0.05


def test_partial_prefill_rows_emit_nothing_and_count_nothing():
    sampled = torch.tensor([[3]], dtype=torch.int32)
    done = finalize_step(sampled, torch.zeros(1, VOCAB),
                         _plan([_row("kad_dual", 0.4)], emitting=[False]))
    assert done.stats == []


def test_a_padded_first_step_emits_one_token_for_correction():
    """A request admitted with one token to compute joins a running batch with ``-1``
    padding drafts; vLLM's CPU kernel can accept a ``-1`` and then sample slot 1 after a
    placeholder context. The first step keeps its first slot (the hook's sample of p,
    corrected by the proposal) and nothing after it."""
    rows = [_row("kad_dual", 0.4, request_id="a"), _row("kad_dual", 0.4, request_id="b")]
    plan = _plan(rows, [3, 2], first=[True, False], padded=frozenset({0}))
    assert plan.corrected == (0,)
    sampled = _sampled([[42, 13], [4, 5, 6]], 4)
    done = finalize_step(sampled, torch.zeros(3 + 2 + 2, VOCAB), plan,
                         corrected=frozenset({0}))
    assert sampled[0].tolist() == [42, PLACEHOLDER, PLACEHOLDER, PLACEHOLDER]
    assert [(s.request_id, s.drafted, s.emitted) for s in done.stats] == [("a", 0, 1),
                                                                          ("b", 2, 2)]


def test_a_padded_row_keeps_its_first_position_only_and_counts_no_drafts():
    """A padded row later in its life (resumed with one token left): one token, sampled at
    its first position; its placeholder 'drafts' are not counted as drafted or accepted."""
    sampled = _sampled([[7, 13, 2]], 4)
    done = finalize_step(sampled, torch.zeros(4, VOCAB),
                         _plan([_row("base")], [3], padded=frozenset({0})))
    assert sampled[0].tolist() == [7, PLACEHOLDER, PLACEHOLDER, PLACEHOLDER]
    assert [(s.drafted, s.accepted, s.emitted, s.positions) for s in done.stats] \
        == [(0, 0, 1, 0)]


def test_a_greedy_padded_row_takes_the_argmax_at_its_first_position():
    logits = torch.zeros(3, VOCAB)
    logits[0, 5] = 9.0  # first position: where the row's token is sampled
    logits[2, 7] = 9.0  # the bonus position, after two placeholders
    sampled = _sampled([[1, 2]], 3)
    finalize_step(sampled, logits, _plan([_row("kad_dual", 0.4, greedy=True)], [2],
                                         padded=frozenset({0})))
    assert sampled[0].tolist() == [5, PLACEHOLDER, PLACEHOLDER]


def test_rule_groups_follow_rule_order_skip_unmixed_and_chunk():
    from server.engine.verification_hook import rule_groups

    groups = list(rule_groups(["kad_dual", "", "aligned", "kad_dual", "kad_dual"], chunk=2))
    assert [(rule, positions.tolist()) for rule, positions in groups] == [
        ("aligned", [2]), ("kad_dual", [0, 3]), ("kad_dual", [4])]
    assert [(r, p.tolist()) for r, p in rule_groups(["base"] * 3)] == [("base", [0, 1, 2])]
    assert list(rule_groups(["", ""])) == []


def test_the_logprobs_stage_reports_pi_where_q_star_exists_and_p_elsewhere():
    """Hand-made step: which slot of vLLM's logprobs tensors gets log pi (with which q*,
    at which logits row, unscaled by the row's temperature) and which gets log p."""
    from server.engine.verification_hook import PlainSamples, logprob_sources, logprobs_of

    gen = torch.Generator().manual_seed(21)
    rows = [_row("kad_dual", 0.4, logprobs=2),      # 2 drafts verified with q*
            _row("base", logprobs=1),               # rule base: vLLM's own log p
            _row("kad_dual", 0.4),                  # no logprobs asked
            _row("aligned", logprobs=0),            # zero drafts, resampled from pi
            _row("kad_dual", 0.4, logprobs=1)]      # 2 drafts verified without q*
    plan = _plan(rows, [2, 1, 1, 0, 2])
    assert plan.first_rows == (0, 3, 5, 7, 8)
    width = 3
    draft_logits = torch.randn(6, VOCAB, generator=gen)
    temperature = torch.tensor([0.5, 1.0, 1.0, 2.0, 1.0])
    owners_t = temperature[plan.owners()].unsqueeze(-1)
    draft_probs = torch.softmax(draft_logits / owners_t, -1)  # the drafter's q_T
    plain_logits = torch.randn(1, VOCAB, generator=gen)
    plain = PlainSamples((3,), torch.tensor([4]), torch.softmax(plain_logits / 2.0, -1),
                         torch.zeros(5, dtype=torch.bool))
    mixed = Mixed(draft_probs, torch.zeros(6), torch.zeros(6, dtype=torch.bool),
                  frozenset({4}))
    sources = logprob_sources(plan, width, mixed, plain)
    assert sources.pi_slots == (0, 1, 9) and sources.pi_logit_rows == (0, 1, 7)
    assert sources.pi_owners == (0, 0, 3)
    assert sources.p_slots == (2, 12, 13, 14)  # row 0's bonus slot, row 4's
    assert sources.p_logit_rows == (2, 8, 9, 10)
    raw = torch.randn(11, VOCAB, generator=gen) * 2
    (p_slots, log_p), (pi_slots, log_pi) = logprobs_of(raw, sources, plan, temperature)
    assert p_slots == sources.p_slots and pi_slots == sources.pi_slots
    torch.testing.assert_close(log_p, torch.log_softmax(raw[[2, 8, 9, 10]], -1))
    # Unscaled: pi of the raw target and the draft's temperature-1 distribution.
    unscaled_q = [torch.softmax(draft_logits[0], -1), torch.softmax(draft_logits[1], -1),
                  torch.softmax(plain_logits[0], -1)]
    for k, (logit_row, rule, param) in enumerate([(0, "kad_dual", 0.4), (1, "kad_dual", 0.4),
                                                  (7, "aligned", None)]):
        expected = mix(torch.softmax(raw[logit_row], -1), unscaled_q[k], rule, param)
        torch.testing.assert_close(log_pi[k].exp(), expected, atol=1e-5, rtol=1e-4)
    # Nothing asked: nothing reported.
    quiet = _plan([_row("kad_dual", 0.4)], [2])
    assert logprobs_of(raw, logprob_sources(quiet, width, mixed), quiet, None) == []


def test_next_drafts_follow_the_plan_by_request_id():
    """The next proposal's drafts, keyed by vLLM request id: greedy rows draft the argmax."""
    from server.engine.hook_context import NextDrafts, next_drafts

    rows = [_row("kad_dual", 0.4, greedy=True), _row("kad_dual", 0.4), None,
            _row("base", greedy=True)]
    plan = StepPlan.build(rows, output_lens=[3, 3, 1, 0], req_ids=["g", "s", "x", "b"])
    assert next_drafts(plan) == {"g": NextDrafts(greedy=True), "b": NextDrafts(greedy=True)}
