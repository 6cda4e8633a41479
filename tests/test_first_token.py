"""Tokens sampled from p before any proposal saw their context, corrected to pi with the
q* of the drafter's first forward (``first_token``), without vLLM."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats as scipy_stats

from kad_kernels import mix
from server.engine.first_token import PendingCorrection, correct
from server.engine.step_plan import RowAlignment
from server.engine.verification_hook import correct_to_pi, processed_pi

VOCAB = 12


def _probs(seed: int, rows: int = 1, sharp: float = 2.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(rows, VOCAB, generator=generator), dim=-1)


def test_corrected_samples_of_p_are_distributed_as_pi_and_kept_as_often_as_possible():
    """x ~ p kept with probability min(1, pi/p), else resampled from (pi - p)+: the result
    is pi, and x is kept with probability 1 - TV(p, pi) (the maximal coupling, so the
    drafts made after x survive as often as they can)."""
    torch.manual_seed(0)
    n = 200_000
    p, pi = _probs(1), _probs(2)
    p_rows, pi_rows = p.expand(n, VOCAB), pi.expand(n, VOCAB)
    x = torch.multinomial(p_rows, 1).squeeze(-1)
    out = correct_to_pi(p_rows, pi_rows, x, None, {})
    counts = np.bincount(out.numpy(), minlength=VOCAB)
    expected = pi[0].double().numpy()
    expected = expected / expected.sum() * n
    assert scipy_stats.chisquare(counts, expected).pvalue > 1e-3
    # Teeth: the uncorrected samples are p's, which the same test rejects.
    assert scipy_stats.chisquare(np.bincount(x.numpy(), minlength=VOCAB),
                                 expected).pvalue < 1e-6
    kept = float((out == x).double().mean())
    tv = 0.5 * float((p - pi).abs().sum())
    assert abs(kept - (1 - tv)) < 0.005, (kept, 1 - tv)


def test_greedy_rows_take_the_argmax_of_pi_and_equal_distributions_keep_every_token():
    p, pi = _probs(3, 4), _probs(4, 4)
    x = torch.tensor([0, 1, 2, 3])
    greedy = torch.tensor([True, False, True, False])
    out = correct_to_pi(p, p.clone(), x, greedy, {})
    assert out[1].item() == 1 and out[3].item() == 3  # pi == p: nothing to correct
    out = correct_to_pi(p, pi, x, greedy, {})
    assert out[0].item() == int(pi[0].argmax()) and out[2].item() == int(pi[2].argmax())


def test_a_seeded_row_corrects_the_same_way_for_the_same_seed():
    p, pi = _probs(5, 3), _probs(6, 3)
    x = torch.tensor([4, 4, 4])

    def run(seed: int) -> list[int]:
        generators = {1: torch.Generator().manual_seed(seed)}
        return [correct_to_pi(p, pi, x, None, generators)[1].item() for _ in range(20)]

    assert run(7) == run(7)
    assert len({tuple(run(s)) for s in range(5)}) > 1


@dataclass
class _Logprobs:
    logprob_token_ids: torch.Tensor
    logprobs: torch.Tensor
    selected_token_ranks: torch.Tensor


@dataclass
class _Output:
    sampled_token_ids: torch.Tensor
    logprobs_tensors: _Logprobs | None


def test_correct_writes_tokens_and_log_pi_and_names_the_requests_whose_drafts_are_void():
    """``correct`` mixes processed p with the drafter's q* at the sampled position (its
    logits divided by the row's temperature), writes the final tokens into vLLM's output
    and, for a row that reports logprobs, the unscaled log pi of its final token."""
    rows = (RowAlignment("a", "kad_dual", 0.4, logprobs=2),
            RowAlignment("b", "confidence_bet", 0.5, greedy=True))
    target_probs = _probs(7, 2)
    raw_logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(8))
    hidden = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(9))
    # The drafter's "compute_logits" is the identity here: hidden states are its logits.
    sampled = torch.tensor([[3, -1], [5, -1], [6, -1]], dtype=torch.int32)
    tensors = _Logprobs(torch.zeros(6, 3, dtype=torch.int64), torch.zeros(6, 3),
                        torch.zeros(6, dtype=torch.int64))
    temperature = torch.tensor([0.7, 1.0])
    pending = PendingCorrection(
        rows=(0, 2), request_ids=("a", "b"), after=(0, 0), alignments=rows,
        target_probs=target_probs, tokens=torch.tensor([3, 6]),
        generators={0: torch.Generator().manual_seed(1)}, temperature=temperature,
        logprob_rows=(0,), raw_logits=raw_logits[:1], num_logprobs=2, forbidden=None,
        output=_Output(sampled, tensors), width=2)
    result = correct(pending, hidden, lambda h: h)
    q_star = (hidden / temperature.unsqueeze(-1)).softmax(-1)
    pi, _ = processed_pi(target_probs, q_star, rows, np.arange(2))
    assert sampled[2, 0].item() == int(pi[1].argmax())  # greedy over pi
    assert sampled[1].tolist() == [5, -1]  # a row not pending is untouched
    assert result.tokens.tolist() == [sampled[0, 0].item(), sampled[2, 0].item()]
    assert set(result.changed) == {r for r, old, new in zip(
        "ab", [3, 6], result.tokens.tolist()) if old != new}
    # Logprobs of row 0 (slot 0 * width): the unscaled pi of its final token, top 2 after.
    unscaled = mix(raw_logits[0].softmax(-1).double(), hidden[0].softmax(-1).double(),
                   "kad_dual", 0.4)
    token = sampled[0, 0].item()
    assert tensors.logprob_token_ids[0, 0].item() == token
    assert abs(tensors.logprobs[0, 0].item() - float(unscaled[token].log())) < 1e-4
    assert tensors.logprob_token_ids[0, 1:].tolist() == unscaled.topk(2).indices.tolist()
    assert tensors.logprobs[2:].abs().sum().item() == 0  # other slots untouched
