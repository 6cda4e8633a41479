"""Summaries: accuracy with a Wilson 95% interval, acceptance, deferred mass, speed.

The comparison table has the paper's Table 2 layout: rows = rule settings, columns =
tasks, plus the average; acceptance, deferred mass and tokens/s are pooled over tasks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval: well behaved near 0 and 1 and for small samples."""
    if total == 0:
        return 0.0, 0.0
    p = correct / total
    center = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, center - half), min(1.0, center + half)


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One task under one setting. Failed requests count as wrong (and as ``errors``);
    ``cut``: answers that ended at ``max_tokens`` (finish reason ``length``), which can lose
    a final answer and so read as wrong."""
    rows = list(records)
    correct = sum(bool(r.get("correct")) for r in rows)
    stats = [r["kad"] for r in rows if isinstance(r.get("kad"), dict)]
    drafted = sum(s.get("drafted_tokens") or 0 for s in stats)
    accepted = sum(s.get("accepted_tokens") or 0 for s in stats)
    alphas = [s["mean_deferred_mass"] for s in stats if s.get("mean_deferred_mass") is not None]
    timed = [r for r in rows if r.get("completion_tokens") and r.get("seconds")]
    tokens = sum(r["completion_tokens"] for r in timed)
    seconds = sum(r["seconds"] for r in timed)
    low, high = wilson(correct, len(rows))
    return {
        "items": len(rows), "correct": correct, "errors": sum(bool(r.get("error")) for r in rows),
        "cut": sum(r.get("finish_reason") == "length" for r in rows),
        "accuracy": correct / len(rows) if rows else 0.0, "ci95": [low, high],
        "drafted_tokens": drafted, "accepted_tokens": accepted,
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_deferred_mass": sum(alphas) / len(alphas) if alphas else None,
        "completion_tokens": tokens, "request_seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else None,
    }


def _pooled(per_task: list[dict[str, Any]]) -> dict[str, float | None]:
    drafted = sum(s["drafted_tokens"] for s in per_task)
    seconds = sum(s["request_seconds"] for s in per_task)
    alphas = [s["mean_deferred_mass"] for s in per_task if s["mean_deferred_mass"] is not None]
    return {
        "acceptance_rate": sum(s["accepted_tokens"] for s in per_task) / drafted
        if drafted else None,
        "mean_deferred_mass": sum(alphas) / len(alphas) if alphas else None,
        "tokens_per_s": sum(s["completion_tokens"] for s in per_task) / seconds
        if seconds else None,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def comparison_table(summaries: dict[str, dict[str, dict[str, Any]]], tasks: list[str]) -> str:
    """Markdown: accuracy % [Wilson 95%] per task, average, pooled alignment stats, answers
    cut at ``max_tokens`` and failed requests (both summed over tasks)."""
    header = ("| setting | " + " | ".join(tasks)
              + " | avg | acceptance | deferred mass | tok/s | cut | failed |")
    lines = [header, "|" + "---|" * (len(tasks) + 7)]
    for label, per_task in summaries.items():
        cells, accs, present = [], [], []
        for task in tasks:
            s = per_task.get(task)
            if s is None:
                cells.append("-")
                continue
            present.append(s)
            accs.append(s["accuracy"])
            cells.append(f"{100 * s['accuracy']:.1f} [{100 * s['ci95'][0]:.1f}, "
                         f"{100 * s['ci95'][1]:.1f}]")
        pooled = _pooled(present)
        avg = 100 * sum(accs) / len(accs) if accs else None
        failed = sum(s["errors"] for s in present)
        cut = sum(s.get("cut", 0) for s in present)
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {_fmt(avg, '.1f')} | "
            f"{_fmt(pooled['acceptance_rate'], '.3f')} | "
            f"{_fmt(pooled['mean_deferred_mass'], '.3f')} | "
            f"{_fmt(pooled['tokens_per_s'], '.1f')} | {cut} | {failed} |"
        )
    return "\n".join(lines)
