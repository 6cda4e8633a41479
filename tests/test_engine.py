"""The vLLM engine with the hook, end to end on the tiny CPU pair (multiprocess engine core).

The oracle is the reference decoder on the same two models: the first generated token of
each request must be distributed as ``pi`` (not ``p``), greedy must follow argmax ``pi``,
mixed batches keep each request's own rule, and the hook's statistics must agree with
the acceptance probabilities ``1 - TV(pi, q*)`` of the prefixes actually generated.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from kad_kernels import mixture_stats
from kad_kernels.rules import TWO_MODEL_RULES
from server.alignment import AlignmentSettings
from server.engine.interface import SamplingOptions
from server.engine.vllm_engine import UnsupportedAlignmentError

pytestmark = pytest.mark.slow

PROMPT_TEXT = "Question: what is two plus two?\nAnswer:"
SAMPLES = 2000
# Rules the two-model engine serves (kad_kernels.rules: not those needing a third model).
ENGINE_RULES = list(TWO_MODEL_RULES)


def pooled_chi_square_pvalue(counts: Counter, probs: torch.Tensor, total: int) -> float:
    """Chi-square goodness of fit, pooling tokens with expected count < 5 into one bin."""
    expected = probs.double().numpy() * total
    observed = np.zeros_like(expected)
    for token, count in counts.items():
        observed[token] += count
    big = expected >= 5
    obs = list(observed[big]) + [observed[~big].sum()]
    exp = list(expected[big]) + [expected[~big].sum()]
    if exp[-1] < 1e-9:
        if obs[-1] > 0:
            return 0.0
        obs, exp = obs[:-1], exp[:-1]
    if len(exp) < 2:
        return 1.0
    exp = np.array(exp) * (sum(obs) / sum(exp))  # scipy wants equal sums to 1e-8
    return float(scipy_stats.chisquare(obs, exp).pvalue)


def tv(counts: Counter, probs: torch.Tensor, total: int) -> float:
    empirical = torch.zeros_like(probs, dtype=torch.float64)
    for token, count in counts.items():
        empirical[token] = count / total
    return 0.5 * float((empirical - probs.double()).abs().sum())


def first_tokens(engine, prompt, alignment, n, seed0=0, **sampling):
    results = engine.complete_many(
        [prompt] * n,
        [SamplingOptions(max_tokens=1, seed=seed0 + i, **sampling) for i in range(n)],
        [alignment] * n,
        timeout=900,
    )
    assert all(len(r.token_ids) == 1 for r in results)
    return Counter(r.token_ids[0] for r in results), results


@pytest.fixture(scope="module")
def prompt(tiny_engine):
    return tiny_engine.engine.tokenizer.encode(PROMPT_TEXT)


@pytest.mark.parametrize("rule", ENGINE_RULES)
def test_first_token_is_distributed_as_pi(tiny_engine, reference_factory, prompt, rule):
    alignment = AlignmentSettings.paper_default(rule)
    reference = reference_factory(rule, alignment.param)
    p, _, pi = reference.next_distributions(prompt)
    counts, _ = first_tokens(tiny_engine, prompt, alignment, SAMPLES)
    assert pooled_chi_square_pvalue(counts, pi, SAMPLES) > 1e-3, (rule, tv(counts, pi, SAMPLES))
    # The test has teeth: where pi is far from p, sampling p (hook inactive) is rejected.
    if 0.5 * float((pi - p).abs().sum()) > 0.15:
        assert pooled_chi_square_pvalue(counts, p, SAMPLES) < 1e-6, rule


def test_bonus_position_follows_pi(tiny_engine, reference_factory, prompt):
    """With gamma 1 the second token is a bonus token whenever the first draft is accepted;
    its conditional distribution given the most frequent first token must be pi's."""
    alignment = AlignmentSettings(rule="aligned")
    reference = reference_factory("aligned", None)
    n = 3000
    results = tiny_engine.complete_many(
        [prompt] * n,
        [SamplingOptions(max_tokens=2, seed=10_000 + i, ignore_eos=True) for i in range(n)],
        [alignment] * n,
        timeout=900,
    )
    firsts = Counter(r.token_ids[0] for r in results)
    token, _ = firsts.most_common(1)[0]
    seconds = Counter(r.token_ids[1] for r in results if r.token_ids[0] == token)
    total = sum(seconds.values())
    assert total >= 300
    p2, _, pi2 = reference.next_distributions(prompt + [token])
    assert pooled_chi_square_pvalue(seconds, pi2, total) > 1e-3
    if 0.5 * float((pi2 - p2).abs().sum()) > 0.15:
        assert pooled_chi_square_pvalue(seconds, p2, total) < 1e-6


def test_greedy_follows_argmax_of_pi(tiny_engine, reference_factory, prompt):
    for rule in ("kad_dual", "aligned", "base"):
        alignment = AlignmentSettings.paper_default(rule)
        reference = reference_factory(rule, alignment.param)
        expected = []
        prefix = list(prompt)
        for _ in range(8):
            _, _, pi = reference.next_distributions(prefix)
            expected.append(int(pi.argmax()))
            prefix.append(expected[-1])
        got = tiny_engine.complete_many(
            [prompt], [SamplingOptions(max_tokens=8, temperature=0.0, ignore_eos=True)],
            [alignment], timeout=300,
        )[0]
        assert got.token_ids == expected, rule
        if rule == "aligned":  # argmax-q* drafts: every one is the argmax of pi = q*
            assert got.stats.accepted == got.stats.drafted > 0


def test_mixed_batch_each_request_gets_its_own_rule(tiny_engine, reference_factory, prompt):
    n = 1500
    base, aligned = AlignmentSettings(rule="base"), AlignmentSettings(rule="aligned")
    results = tiny_engine.complete_many(
        [prompt] * (2 * n),
        [SamplingOptions(max_tokens=1, seed=50_000 + i) for i in range(2 * n)],
        [base if i % 2 == 0 else aligned for i in range(2 * n)],
        timeout=900,
    )
    p, q_star, _ = reference_factory("base", None).next_distributions(prompt)
    base_counts = Counter(r.token_ids[0] for r in results[0::2])
    aligned_counts = Counter(r.token_ids[0] for r in results[1::2])
    assert pooled_chi_square_pvalue(base_counts, p, n) > 1e-3
    assert pooled_chi_square_pvalue(aligned_counts, q_star, n) > 1e-3
    assert pooled_chi_square_pvalue(base_counts, q_star, n) < 1e-6
    assert pooled_chi_square_pvalue(aligned_counts, p, n) < 1e-6


def test_statistics_match_the_acceptance_probabilities(tiny_engine, reference_factory, prompt):
    rule, lam = "kad_dual", 0.4
    reference = reference_factory(rule, lam)
    n, length = 60, 12
    results = tiny_engine.complete_many(
        [prompt] * n,
        [SamplingOptions(max_tokens=length, seed=90_000 + i, ignore_eos=True) for i in range(n)],
        [AlignmentSettings(rule=rule, lam=lam)] * n,
        timeout=900,
    )
    accepted = drafted = 0
    expected = variance = 0.0
    alpha_expected = 0.0
    positions = 0
    for result in results:
        stats = result.stats
        assert stats is not None
        assert stats.accepted <= stats.drafted
        assert stats.emitted == len(result.token_ids) == length
        assert stats.inexact == 0
        accepted += stats.accepted
        drafted += stats.drafted
        positions += stats.positions
        # Every returned token of a mixing rule after the first was one verified draft
        # position (no bonus); the first is sampled at the prefill and corrected to pi.
        prefix = list(prompt) + result.token_ids[:1]
        for token in result.token_ids[1:]:
            p, q_star, _ = reference.next_distributions(prefix)
            mixture = mixture_stats(p, q_star, rule, lam)
            a = float(mixture.acceptance)
            expected += a
            variance += a * (1 - a)
            alpha_expected += float(mixture.alpha)
            prefix.append(token)
    tried = n * (length - 1)
    assert drafted == tried  # gamma 1: one draft per emitted token after the first
    assert abs(accepted - expected) <= 4 * math.sqrt(variance) + 1, (accepted, expected)
    total_alpha = sum(r.stats.alpha_sum for r in results)
    assert total_alpha == pytest.approx(alpha_expected, rel=1e-3, abs=1e-3)
    totals = tiny_engine.engine.totals()[rule]
    assert totals.accepted >= accepted and totals.drafted >= drafted


def test_unsupported_rule_is_rejected_and_engine_keeps_serving(tiny_engine, prompt):
    with pytest.raises(UnsupportedAlignmentError, match="implicit_reward"):
        tiny_engine.engine.generate(
            "bad-1", prompt, SamplingOptions(max_tokens=2), AlignmentSettings(rule="implicit_reward")
        )
    with pytest.raises(ValueError, match="at least one token"):
        tiny_engine.engine.generate(
            "bad-2", [], SamplingOptions(max_tokens=2), AlignmentSettings(rule="base")
        )
    for bad in ({"rule": "nope"}, {"rule": "kad_dual", "mu": 0.3}, {"rule": "kad_dual", "lam": 1.5},
                {"rule": "base", "lam": 0.3}):
        with pytest.raises(ValueError):
            AlignmentSettings(**bad)
    ok = tiny_engine.complete_many(
        [prompt], [SamplingOptions(max_tokens=4, seed=1, ignore_eos=True)],
        [AlignmentSettings(rule="kad_dual", lam=0.4)], timeout=300,
    )[0]
    assert len(ok.token_ids) == 4 and ok.finish_reason == "length"
    assert tiny_engine.engine.num_unfinished_requests() == 0


def test_vllm_engine_metrics_are_collected(tiny_engine, prompt):
    """vLLM's statistics are on: its Prometheus metrics fill the engine's registry (the one
    /metrics merges), speculative decoding counts included."""
    from prometheus_client import generate_latest

    tiny_engine.complete_many(
        [prompt] * 2, [SamplingOptions(max_tokens=6, seed=3, ignore_eos=True)] * 2,
        [AlignmentSettings(rule="kad_dual", lam=0.4)] * 2, timeout=300,
    )
    text = generate_latest(tiny_engine.engine.metrics_registry).decode()

    def value(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{"))

    for gauge in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running",
                  "vllm:num_requests_waiting", "vllm:num_preemptions_total"):
        assert f"{gauge}{{" in text, gauge
    assert value("vllm:generation_tokens_total") >= 12
    assert value("vllm:spec_decode_num_draft_tokens_total") > 0
    assert "vllm:spec_decode_num_accepted_tokens_total{" in text


def test_same_seed_gives_the_same_text(tiny_engine, prompt):
    alignment = AlignmentSettings(rule="kad_dual", lam=0.4)
    runs = [
        tiny_engine.complete_many(
            [prompt], [SamplingOptions(max_tokens=12, seed=1234, ignore_eos=True)],
            [alignment], timeout=300,
        )[0].token_ids
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_stop_strings_end_the_text_and_free_the_request(tiny_engine, prompt):
    alignment = AlignmentSettings(rule="base")
    free = tiny_engine.complete_many(
        [prompt], [SamplingOptions(max_tokens=16, seed=7, ignore_eos=True)], [alignment],
        timeout=300,
    )[0]
    # A character that first occurs after the start of the text (seeded: deterministic).
    index = next(i for i in range(2, len(free.text)) if free.text[i] not in free.text[:i])
    stop = free.text[index]
    cut = tiny_engine.complete_many(
        [prompt], [SamplingOptions(max_tokens=16, seed=7, ignore_eos=True, stop=(stop,))],
        [alignment], timeout=300,
    )[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index(stop)]
    assert tiny_engine.engine.num_unfinished_requests() == 0


def test_a_prompt_found_in_the_prefix_cache_is_still_exact(tiny_engine, reference_factory, prompt):
    """A repeated prompt whose cached part leaves one token to compute is admitted by vLLM's
    scheduler with placeholder drafts (-1). Its first token must still be pi's (corrected
    from p by the proposal, not kept from p), and the batch must keep its q*."""
    alignment = AlignmentSettings.paper_default("kad_dual")
    reference = reference_factory("kad_dual", alignment.param)
    for block in (16, 32, 64, 128):  # whatever the KV block size: one full block + 1 token
        ids = (list(prompt) * (block // len(prompt) + 3))[: block + 2]
        expected, prefix = [], list(ids)
        for _ in range(6):
            _, _, pi = reference.next_distributions(prefix)
            expected.append(int(pi.argmax()))
            prefix.append(expected[-1])
        for attempt in range(2):  # the second run finds the first block in the prefix cache
            got = tiny_engine.complete_many(
                [ids], [SamplingOptions(max_tokens=6, temperature=0.0, ignore_eos=True)],
                [alignment], timeout=300,
            )[0]
            assert got.token_ids == expected, (block, attempt)
            assert got.stats.inexact == 0, (block, attempt)


def test_every_dashboard_query_reads_series_the_server_exports(tiny_engine, prompt):
    """The Grafana dashboard's queries name series that a real server's /metrics has: the
    app's kad_* (as the endpoints record them) and vLLM's own, from this engine."""
    import json
    import re

    from prometheus_client import generate_latest

    from bench.dashboard import DASHBOARD
    from server.metrics import ServerMetrics

    tiny_engine.complete_many(
        [prompt], [SamplingOptions(max_tokens=4, seed=5, ignore_eos=True)],
        [AlignmentSettings(rule="kad_dual", lam=0.4)], timeout=300)
    metrics = ServerMetrics(tiny_engine.engine.totals, lambda: 0,
                            tiny_engine.engine.metrics_registry)
    metrics.first_token.labels("/v1/completions").observe(0.1)  # what a request records
    metrics.generation_tokens.labels("kad_dual 0.4").inc(4)
    metrics.requests.labels("/v1/completions", "200").inc()
    exported = {line.split("{")[0].split(" ")[0]
                for line in generate_latest(metrics.registry).decode().splitlines()
                if line and not line.startswith("#")}
    dashboard = json.loads(DASHBOARD.read_text())
    named = {name for panel in dashboard["panels"] for target in panel["targets"]
             for name in re.findall(r"([a-z_:]+)(?:\{|\[)", target["expr"])}
    assert named and named <= exported, named - exported


def test_vllm_token_counters_agree_with_the_tokens_clients_are_billed(tiny_engine, prompt):
    """vLLM's own prompt and generation counters on /metrics count what the requests'
    usage counts: every prompt token once, every generated token once (no prompt token
    is ever vLLM output), over 20 requests of varied prompts, lengths and rules."""
    import time

    registry = tiny_engine.engine.metrics_registry

    def total(name: str) -> float:
        return sum(sample.value for metric in registry.collect() for sample in metric.samples
                   if sample.name == name)

    names = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")
    before = {name: total(name) for name in names}
    rules = ["kad_dual", "confidence_bet", "aligned", "base"]
    prompts = [prompt[:3 + i % 7] + prompt for i in range(20)]
    results = tiny_engine.complete_many(
        prompts,
        [SamplingOptions(max_tokens=3 + i % 9, seed=i, temperature=0.0 if i % 5 == 0 else 1.0)
         for i in range(20)],
        [AlignmentSettings.paper_default(rules[i % 4]) for i in range(20)], timeout=600)
    billed = {names[0]: sum(len(p) for p in prompts),
              names[1]: sum(len(r.token_ids) for r in results)}
    deadline = time.monotonic() + 10  # vLLM records its stats after the outputs go out
    while time.monotonic() < deadline and any(
            total(name) - before[name] != billed[name] for name in names):
        time.sleep(0.1)
    assert {name: total(name) - before[name] for name in names} == billed


def test_a_seed_reproduces_beside_new_requests_whose_first_token_changes(tiny_engine, prompt):
    """Seeded requests prefilled in one step with seven others (the engine core is frozen
    while all eight are added): where another request's first token is corrected to a
    different one, the proposal runs again; a seeded request whose own token stood must
    draw the same drafts and leave its generator where it would have alone (its
    correction's draws included), so its text equals its text alone."""
    import threading
    import time

    import psutil

    (core,) = [p for p in psutil.Process().children(recursive=True)
               if "EngineCor" in p.name()]
    tokenizer = tiny_engine.engine.tokenizer
    others = [tokenizer.encode(f"Other request {i}: a different prompt") for i in range(7)]
    alignment = AlignmentSettings.paper_default("kad_dual")
    for seed in range(6):
        seeded = SamplingOptions(max_tokens=24, seed=seed, temperature=1.0, ignore_eos=True)
        alone = tiny_engine.complete_many([prompt], [seeded], [alignment], timeout=300)[0]
        crowd: list = []
        core.suspend()
        try:
            samplings = [seeded] + [SamplingOptions(max_tokens=24, temperature=1.0,
                                                    ignore_eos=True)] * 7
            worker = threading.Thread(target=lambda out=crowd, sent=samplings: out.extend(
                tiny_engine.complete_many([prompt] + others, sent, [alignment] * 8,
                                          timeout=300)))
            worker.start()
            time.sleep(1.0)  # all eight reach the frozen core's input queue
        finally:
            core.resume()
        worker.join(timeout=300)
        assert crowd[0].token_ids == alone.token_ids, seed
