"""The tiny pair and the reference decoder: determinism, oracle identities, spec == AR."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from scipy import stats as scipy_stats

from kad_kernels import mix
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
    p, q, pi = reference_factory("kad_dual", 0.4).next_distributions(prompt_ids)
    torch.testing.assert_close(pi, mix(p, q, "kad_dual", 0.4))
    assert float(pi.sum()) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(reference_factory("base").next_distributions(prompt_ids)[2], p)
    torch.testing.assert_close(reference_factory("aligned").next_distributions(prompt_ids)[2], q)
    assert 0.5 * float((p - q).abs().sum()) > 0.3  # the two models really differ


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
