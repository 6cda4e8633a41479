"""``kad-bench score``'s workload and table (the throughput runs themselves are benchmarks,
not tests: docs/evaluation.md)."""

from __future__ import annotations

from bench.score import prompts_for, table


def test_prompts_have_the_asked_length_and_differ(tokenizer):
    prompts = prompts_for(tokenizer, 4, 300)
    assert [len(p) for p in prompts] == [300] * 4
    assert len({tuple(p) for p in prompts}) == 4


def test_the_table_gives_each_system_its_ratio_to_vllms_target_alone():
    records = [
        {"system": "kad", "batch": 1, "length": 128, "tokens_per_s": 12.0},
        {"system": "vllm-target", "batch": 1, "length": 128, "tokens_per_s": 20.0},
        {"system": "reference", "batch": 1, "length": 128, "tokens_per_s": 28.0},
        {"system": "kad", "batch": 8, "length": 128, "tokens_per_s": 30.0},
    ]
    lines = table(records).splitlines()
    assert lines[0] == "| batch | length | kad tok/s | vllm-target tok/s | reference tok/s |"
    assert lines[2] == "| 1 | 128 | 12 (0.60x) | 20 | 28 (1.40x) |"
    assert lines[3] == "| 8 | 128 | 30 | - | - |"
