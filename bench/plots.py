"""PNG plots of benchmark records (``kad-bench engine --json`` / ``kad-bench serve`` JSON).

The record format both benchmarks write: a JSON list of dicts with ``system`` (e.g.
``"vllm-ar"``, ``"vllm-spec-base"``, ``"kad:kad_dual:0.4"``, ``"reference"``), ``rule``,
``param``, ``gamma`` (None for autoregressive systems), ``concurrency``, ``tokens_per_s``
(median of repeats), optional ``ttft_s``, ``acceptance_rate`` (None without drafts) and
``repeats`` (the raw tokens/s of each repeat). Other keys are ignored.

    python -m bench.plots results/bench/serve.json [more.json ...] --out results/bench
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# The KAD paper's Figure 2 colours: dual approximation brown, primal blue, nudging red.
RULE_COLOURS = {"kad_dual": "tab:brown", "kad_primal": "tab:blue", "nudging": "tab:red"}
OTHER_COLOURS = ["tab:gray", "tab:green", "tab:orange", "tab:purple", "tab:olive", "tab:cyan",
                 "tab:pink", "black"]
GAMMA_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]


def _gamma_key(gamma: Any) -> tuple[bool, Any]:
    return gamma is None, gamma if gamma is not None else 0


def _colours(systems: list[str]) -> dict[str, str]:
    """Paper colours for ``kad:<rule>:...`` systems of its three rules, distinct others."""
    colours, others = {}, iter(OTHER_COLOURS * (1 + len(systems) // len(OTHER_COLOURS)))
    for system in sorted(set(systems)):
        parts = system.split(":")
        rule = parts[1] if parts[0] == "kad" and len(parts) > 1 else None
        colours[system] = RULE_COLOURS.get(rule or "") or next(others)
    return colours


def _spread(values: list[float], centre: float) -> tuple[float, float]:
    """Distance from the median to the lowest and highest repeat (error-bar lengths)."""
    return (centre - min(values), max(values) - centre) if values else (0.0, 0.0)


def plot_acceptance(records: list[dict[str, Any]], path: Path) -> Path:
    """Acceptance rate by rule setting (bars) and gamma (groups): the paper's Figure 2.

    A (system, gamma) measured at several concurrencies shows the mean over them
    (acceptance does not depend on batching); error bars span the repeats.
    """
    values: dict[tuple[str, Any], list[float]] = defaultdict(list)
    repeats: dict[tuple[str, Any], list[float]] = defaultdict(list)
    for r in records:
        if r.get("acceptance_rate") is not None:
            values[r["system"], r.get("gamma")].append(r["acceptance_rate"])
            repeats[r["system"], r.get("gamma")] += [
                v for v in r.get("acceptance_repeats") or [] if v is not None]
    systems = sorted({s for s, _ in values})
    gammas = sorted({g for _, g in values}, key=_gamma_key)
    colours = _colours(systems)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    width = 0.8 / max(1, len(systems))
    for k, system in enumerate(systems):
        xs, ys, errs = [], [], [[], []]
        for j, gamma in enumerate(gammas):
            if (system, gamma) not in values:
                continue
            mean = statistics.fmean(values[system, gamma])
            low, high = _spread(repeats[system, gamma], mean)
            xs.append(j + (k - (len(systems) - 1) / 2) * width)
            ys.append(mean)
            errs[0].append(max(0.0, low))
            errs[1].append(max(0.0, high))
        ax.bar(xs, ys, width=width, yerr=errs, capsize=3, label=system,
               color=colours[system])
    ax.set_xticks(range(len(gammas)), ["n/a" if g is None else str(g) for g in gammas])
    ax.set_xlabel("gamma (draft tokens per step)")
    ax.set_ylabel("acceptance rate")
    ax.set_ylim(0, 1)
    if systems:
        ax.legend(fontsize=7)
    ax.set_title("Acceptance rate by rule and gamma")
    return _save(fig, path)


def _plot_vs_concurrency(records: list[dict[str, Any]], path: Path, key: str, repeats_key: str,
                         ylabel: str, title: str, scale: float = 1.0) -> Path:
    """One line per (system, gamma): colour = system, line style and marker = gamma.

    Records of several tasks at one concurrency are averaged; error bars span all repeats.
    """
    series: dict[tuple[str, Any], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get(key) is not None:
            series[r["system"], r.get("gamma")].append(r)
    colours = _colours([system for system, _ in series])
    gammas = sorted({gamma for _, gamma in series}, key=_gamma_key)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for (system, gamma), points in sorted(series.items(), key=lambda kv: (kv[0][0],
                                                                         _gamma_key(kv[0][1]))):
        by_level: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for r in points:  # several tasks at one concurrency: their mean
            by_level[r["concurrency"]].append(r)
        levels = sorted(by_level)
        ys = [statistics.fmean(r[key] for r in by_level[c]) * scale for c in levels]
        spreads = [_spread([v * scale for r in by_level[c] for v in r.get(repeats_key) or []
                            if v is not None], y) for c, y in zip(levels, ys, strict=True)]
        style, marker = GAMMA_STYLES[gammas.index(gamma) % len(GAMMA_STYLES)]
        ax.errorbar(levels, ys, capsize=3, color=colours[system],
                    linestyle=style, marker=marker,
                    label=system if gamma is None else f"{system} γ={gamma}",
                    yerr=[[max(0.0, s[0]) for s in spreads], [max(0.0, s[1]) for s in spreads]])
    concurrencies = sorted({r["concurrency"] for points in series.values() for r in points})
    ax.set_xscale("log", base=2)
    ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel(ylabel)
    if series:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title)
    return _save(fig, path)


def plot_throughput(records: list[dict[str, Any]], path: Path) -> Path:
    """Aggregate tokens/s against concurrency, one line per system and gamma."""
    return _plot_vs_concurrency(records, path, "tokens_per_s", "repeats",
                                "tokens/s (aggregate)", "Throughput vs concurrency")


def plot_ttft(records: list[dict[str, Any]], path: Path) -> Path:
    """Median time to first token (ms) against concurrency."""
    return _plot_vs_concurrency(records, path, "ttft_s", "ttft_repeats",
                                "time to first token (ms)", "TTFT vs concurrency", scale=1e3)


def plot_soak(summary: dict[str, Any], path: Path) -> Path:
    """A ``kad-bench soak`` summary over time: tokens/s, latency percentiles per bucket
    (minute), and the sampled ``kad_requests_running`` and server RSS; shaded spans mark
    the engine core's SIGSTOPs, dotted lines the bursts past the queue bound."""
    rows = summary["per_minute"]
    width = summary.get("bucket_seconds", 60.0) / 60.0
    mids = [(r["from_s"] + r["to_s"]) / 120.0 for r in rows]
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(8, 8.4), sharex=True)
    top.plot(mids, [r["tokens_per_s"] for r in rows], marker="o", color="tab:brown",
             label="tokens/s")
    top.set_ylabel("tokens/s (completed)")
    rate = top.twinx()
    rate.plot(mids, [r["requests_per_s"] for r in rows], marker="s", linestyle="--",
              color="tab:gray", label="requests/s")
    rate.set_ylabel("requests/s")
    top.set_ylim(bottom=0)
    rate.set_ylim(bottom=0)
    top.legend(handles=top.get_lines() + rate.get_lines(), fontsize=7, loc="lower left")
    for key, label, colour, style in [("ttft_p50_s", "TTFT p50", "tab:blue", "-"),
                                      ("ttft_p95_s", "TTFT p95", "tab:blue", "--"),
                                      ("total_p50_s", "total p50", "tab:red", "-"),
                                      ("total_p95_s", "total p95", "tab:red", "--")]:
        points = [(x, r[key] * 1e3) for x, r in zip(mids, rows, strict=True)
                  if r[key] is not None]
        if points:
            middle.plot(*zip(*points, strict=True), marker="o", color=colour,
                        linestyle=style, label=label)
    middle.set_ylabel("latency (ms)")
    middle.set_yscale("log")
    middle.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    samples = summary.get("samples") or []
    start = summary.get("load_start_s", 0.0)
    xs = [(s["t"] - start) / 60.0 for s in samples if s.get("running") is not None]
    bottom.step(xs, [s["running"] for s in samples if s.get("running") is not None],
                where="post", color="tab:green", label="kad_requests_running")
    bottom.set_ylabel("kad_requests_running")
    bottom.set_ylim(bottom=0)
    memory = bottom.twinx()
    rss = [((s["t"] - start) / 60.0, s["rss"] / 2**20) for s in samples if s.get("rss")]
    if rss:
        memory.plot(*zip(*rss, strict=True), color="tab:purple", label="RSS, server + engine")
        memory.set_ylabel("RSS (MiB)")
    bottom.legend(handles=bottom.get_lines() + memory.get_lines(), fontsize=7,
                  loc="lower left")
    for ax in (top, middle, bottom):
        for fault in summary.get("faults") or []:
            at = (fault["at_s"] - start) / 60.0
            ax.axvspan(at, at + fault["seconds"] / 60.0, color="tab:orange", alpha=0.3)
        for burst in summary.get("bursts") or []:
            ax.axvline((burst["at_s"] - start) / 60.0, color="black", linestyle=":",
                       linewidth=0.8)
    bottom.set_xlabel(f"minutes of load (rows of {width:g} min; orange: engine SIGSTOP, "
                      "dotted: bursts)")
    top.set_title(f"kad-bench soak: {summary.get('load_seconds', 0):g} s, concurrency "
                  f"{summary.get('concurrency')}, lost {summary.get('lost')}, "
                  f"inexact {summary.get('inexact')}")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_all(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """acceptance.png and throughput.png, plus ttft.png when TTFTs were measured."""
    paths = [plot_acceptance(records, out / "acceptance.png"),
             plot_throughput(records, out / "throughput.png")]
    if any(r.get("ttft_s") is not None for r in records):
        paths.append(plot_ttft(records, out / "ttft.png"))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="plot benchmark JSON records")
    parser.add_argument("records", type=Path, nargs="+", help="JSON lists; merged in order")
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    args = parser.parse_args(argv)
    records = [r for path in args.records for r in json.loads(path.read_text())]
    for path in render_all(records, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
