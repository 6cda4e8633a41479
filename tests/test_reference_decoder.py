"""The tiny pair and the reference decoder: determinism, oracle identities, spec == AR."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from scipy import stats as scipy_stats

from kad_kernels.tiny_models import MARKER, build_tiny_pair

PROMPT = "Question: what is two plus two?\nAnswer:"


@pytest.fixture(scope="module")
def prompt_ids(tiny_pair):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_pair.draft).encode(PROMPT)


def test_tiny_pair_is_deterministic_cached_and_loadable(tiny_pair, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    again = build_tiny_pair(tiny_pair.root)  # cached: returns without rebuilding
    assert again == tiny_pair
    other = build_tiny_pair(tmp_path / "pair")
    for name in ("draft", "target"):
        a = load_file(getattr(tiny_pair, name) / "model.safetensors")
        b = load_file(getattr(other, name) / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        config = AutoConfig.from_pretrained(getattr(tiny_pair, name))
        assert config.head_dim == 64 and config.model_type == "qwen2"
    assert json.loads((tiny_pair.root / MARKER).read_text())["seed"] == 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair.draft)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|endoftext|>"


def test_next_distributions_are_the_mixture(reference_factory, prompt_ids):
    """``(p, q*, pi)`` against an independent computation: each model's softmax at the last
    position (float64), and pi by a literal loop over the vocabulary, the rule of DESIGN.md
    for kad_dual: d_v = [p_v < lam], alpha = sum_v p_v d_v, pi_v = p_v (1 - d_v) + alpha q*_v.
    ``lam`` lies between the 2nd and 3rd largest p, so the rule keeps two tokens and defers
    the rest: neither p nor q* passes for pi."""
    target, draft = reference_factory("base").target.model, reference_factory("base").draft.model
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        p_ref = target(input_ids=ids).logits[0, -1].double().softmax(-1)
        q_ref = draft(input_ids=ids).logits[0, -1].double().softmax(-1)
    assert 0.5 * float((p_ref - q_ref).abs().sum()) > 0.3  # the two models really differ
    top = p_ref.topk(3).values.tolist()
    lam = (top[1] + top[2]) / 2
    p_list, q_list = p_ref.tolist(), q_ref.tolist()
    deferred = [p_v < lam for p_v in p_list]
    alpha = sum(p_v for p_v, d_v in zip(p_list, deferred) if d_v)
    expected = [p_v * (1 - d_v) + alpha * q_v for p_v, d_v, q_v in zip(p_list, deferred, q_list)]
    assert deferred.count(False) == 2 and 0.05 < alpha < 0.95

    p, q, pi = reference_factory("kad_dual", lam).next_distributions(prompt_ids)
    torch.testing.assert_close(p.double(), p_ref, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(q.double(), q_ref, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(pi.double(), torch.tensor(expected, dtype=torch.float64),
                               atol=1e-6, rtol=1e-4)
    for rule, reference in (("base", p_ref), ("aligned", q_ref)):
        pi = reference_factory(rule).next_distributions(prompt_ids)[2]
        torch.testing.assert_close(pi.double(), reference, atol=1e-6, rtol=1e-4)


def test_batched_prompt_scoring_equals_next_distributions_at_every_position(
        reference_factory, prompt_ids):
    """The benchmarks' two-model ``transformers`` scoring loop (right-padded batches, the
    mixture in position chunks) gives log pi of each prompt token, as one
    ``next_distributions`` call per position does."""
    reference = reference_factory("confidence_bet", 0.2, temperature=1.0)
    prompts = [prompt_ids, prompt_ids[:5], prompt_ids[3:] + prompt_ids]
    scores = reference.score_prompts(prompts, batch_size=2, positions_per_chunk=4)
    assert [len(s) for s in scores] == [len(p) - 1 for p in prompts]
    for prompt, values in zip(prompts, scores):
        for t in range(1, len(prompt)):
            pi = reference.next_distributions(prompt[:t])[2]
            assert abs(values[t - 1] - math.log(float(pi[prompt[t]]))) < 1e-4, t


@pytest.mark.parametrize(("rule", "param"), [("kad_dual", 0.4), ("kad_primal", 0.9)])
def test_speculative_mode_has_the_ar_distribution(reference_factory, prompt_ids, rule, param):
    """First two tokens of the speculative decoder vs the exact 2-token distribution."""
    decoder = reference_factory(rule, param)
    runs = 1500
    gen = torch.Generator().manual_seed(0)
    pairs = Counter(
        tuple(decoder.generate_speculative(prompt_ids, 2, gamma=2, generator=gen).token_ids)
        for _ in range(runs)
    )
    _, _, pi0 = decoder.next_distributions(prompt_ids)
    firsts = Counter()
    for (a, _), n in pairs.items():
        firsts[a] += n
    top = [t for t, _ in firsts.most_common(4)]
    observed, expected = [], []
    for a in top:  # the joint on the most frequent first tokens, the rest pooled
        _, _, pi1 = decoder.next_distributions(prompt_ids + [a])
        for b in pi1.topk(3).indices.tolist():
            observed.append(pairs.get((a, b), 0))
            expected.append(float(pi0[a] * pi1[b]) * runs)
    observed.append(runs - sum(observed))
    expected.append(runs - sum(expected))
    assert min(expected) > 5
    assert scipy_stats.chisquare(observed, expected).pvalue > 1e-4


def test_greedy_speculative_equals_greedy_ar(reference_factory, prompt_ids):
    decoder = reference_factory("kad_dual", 0.4, temperature=0.0)
    ar = decoder.generate_ar(prompt_ids, 16)
    for gamma in (1, 3, 5):
        assert decoder.generate_speculative(prompt_ids, 16, gamma=gamma).token_ids == ar.token_ids


def test_decode_result_statistics(reference_factory, prompt_ids):
    decoder = reference_factory("nudging", 0.4)
    result = decoder.generate_speculative(
        prompt_ids, 12, gamma=3, generator=torch.Generator().manual_seed(3)
    )
    assert result.accepted <= result.drafted
    assert result.emitted == len(result.token_ids) == len(result.alphas) == 12
    assert all(0.0 <= a <= 1.0 for a in result.alphas)
