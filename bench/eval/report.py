"""Summaries: accuracy with a Wilson 95% interval, acceptance, deferred mass, speed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    if total == 0:
        return 0.0, 0.0
    p = correct / total
    center = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, center - half), min(1.0, center + half)


def summarize(path: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    correct = sum(bool(r["correct"]) for r in rows)
    stats = [r["kad"] for r in rows if r.get("kad")]
    drafted = sum(s.get("drafted_tokens", 0) for s in stats)
    accepted = sum(s.get("accepted_tokens", 0) for s in stats)
    alphas = [s["mean_deferred_mass"] for s in stats if "mean_deferred_mass" in s]
    tokens = sum(r.get("completion_tokens") or 0 for r in rows)
    seconds = sum(r.get("seconds") or 0 for r in rows)
    low, high = wilson(correct, len(rows))
    return {
        "items": len(rows), "correct": correct, "errors": sum(bool(r.get("error")) for r in rows),
        "accuracy": correct / len(rows) if rows else 0.0, "ci95": [low, high],
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_deferred_mass": sum(alphas) / len(alphas) if alphas else None,
        "tokens_per_s_per_request": tokens / seconds if seconds else None,
    }


def comparison_table(summaries: dict[str, dict[str, dict[str, Any]]], tasks: list[str]) -> str:
    """Markdown like the paper's Table 2: rows = settings, columns = tasks, plus average."""
    header = "| setting | " + " | ".join(tasks) + " | avg | acceptance | deferred mass |"
    lines = [header, "|" + "---|" * (len(tasks) + 4)]
    for label, per_task in summaries.items():
        cells, accs, acc_rates, alphas = [], [], [], []
        for task in tasks:
            s = per_task.get(task)
            if s is None:
                cells.append("-")
                continue
            accs.append(s["accuracy"])
            cells.append(f"{100 * s['accuracy']:.1f} [{100 * s['ci95'][0]:.0f}-"
                         f"{100 * s['ci95'][1]:.0f}]")
            if s["acceptance_rate"] is not None:
                acc_rates.append(s["acceptance_rate"])
            if s["mean_deferred_mass"] is not None:
                alphas.append(s["mean_deferred_mass"])
        avg = f"{100 * sum(accs) / len(accs):.1f}" if accs else "-"
        rate = f"{sum(acc_rates) / len(acc_rates):.3f}" if acc_rates else "-"
        alpha = f"{sum(alphas) / len(alphas):.3f}" if alphas else "-"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {avg} | {rate} | {alpha} |")
    return "\n".join(lines)
