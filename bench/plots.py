"""PNG plots of benchmark records (``kad-bench engine`` / ``kad-bench serve`` JSON).

Records are dicts with ``system``, ``rule``, ``param``, ``gamma``, ``concurrency``,
``tokens_per_s`` and ``acceptance_rate``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_acceptance(records: list[dict[str, Any]], path: Path) -> None:
    """Acceptance rate by rule setting and gamma (the KAD paper's Figure 2 layout)."""
    series: dict[str, dict[Any, float]] = defaultdict(dict)
    for r in records:
        if r.get("acceptance_rate") is not None:
            series[r["system"]][r.get("gamma")] = r["acceptance_rate"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for system, points in sorted(series.items()):
        gammas = sorted(points, key=lambda g: (g is None, g))
        xs = [str(g) for g in gammas]
        ax.plot(xs, [points[g] for g in gammas], marker="o", label=system)
    ax.set_xlabel("gamma (draft tokens per step)")
    ax.set_ylabel("acceptance rate")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("Acceptance rate by rule and gamma")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_throughput(records: list[dict[str, Any]], path: Path) -> None:
    """Aggregate tokens/s against concurrency, one line per system and gamma."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        label = r["system"] if r.get("gamma") is None else f"{r['system']} g={r['gamma']}"
        series[label].append((r["concurrency"], r["tokens_per_s"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([c for c, _ in points], [t for _, t in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("tokens/s (aggregate)")
    ax.legend(fontsize=7)
    ax.set_title("Throughput vs concurrency")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="plot benchmark JSON records")
    parser.add_argument("records", type=Path)
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    args = parser.parse_args(argv)
    records = json.loads(args.records.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    plot_acceptance(records, args.out / "acceptance.png")
    plot_throughput(records, args.out / "throughput.png")
    return 0
