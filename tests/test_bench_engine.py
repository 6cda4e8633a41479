"""``kad-bench engine`` records: acceptance and deferred mass pooled over the repeats."""

from __future__ import annotations

import pytest

from bench.engine import _record
from server.alignment import AlignmentSettings
from server.engine.interface import RequestStats


def test_record_pools_acceptance_and_deferred_mass_over_repeats():
    runs = [
        (10.0, RequestStats(drafted=10, accepted=9, positions=10, alpha_sum=1.0)),
        (30.0, RequestStats(drafted=30, accepted=15, positions=40, alpha_sum=20.0)),
        (20.0, RequestStats(drafted=60, accepted=30, positions=50, alpha_sum=9.0)),
    ]
    record = _record("kad:kad_dual:0.4", AlignmentSettings(rule="kad_dual", lam=0.4), 5, 4, runs)
    assert record["tokens_per_s"] == 20.0  # median, not mean
    assert record["acceptance_rate"] == pytest.approx(54 / 100)  # pooled, not a median of rates
    assert record["mean_deferred_mass"] == pytest.approx(30.0 / 100)
    assert (record["rule"], record["param"], record["gamma"], record["concurrency"]) == \
        ("kad_dual", 0.4, 5, 4)


def test_plain_decoding_has_no_acceptance_or_deferred_mass():
    record = _record("vllm-ar", None, None, 1, [(3.0, None), (5.0, None)])
    assert record["acceptance_rate"] is None and record["mean_deferred_mass"] is None
    assert record["repeats"] == [3.0, 5.0]
