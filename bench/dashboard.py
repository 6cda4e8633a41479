"""Record a server's ``/metrics`` over time and render the Grafana dashboard's panels from it.

``kad-bench dashboard record --base-url URL --seconds N --out scrapes.jsonl`` scrapes every
``--interval`` seconds (as Prometheus would); ``kad-bench dashboard render --scrapes
scrapes.jsonl --out dashboard.png`` draws each panel of
``docker/grafana/dashboards/kad-serve.json`` from those scrapes, evaluating its queries.
Where no Grafana runs (a CI machine, a laptop without docker), this shows what the
dashboard shows, from the same queries.

The evaluator covers the PromQL the dashboard uses, no more: ``sum``/``max`` with an
optional ``by (labels)`` over a series, ``rate(...[w])`` or ``increase(...[w])``;
``histogram_quantile(q, sum by (le) (rate(..._bucket[w])))``; one ``/`` between two such
aggregations (matched on their labels). ``{instance=~"$instance"}`` selects every instance.
A query outside that subset is an error (tests check every panel parses), never a silent
gap in the picture.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parent.parent / "docker/grafana/dashboards/kad-serve.json"

Labels = tuple[tuple[str, str], ...]
Series = dict[Labels, list[tuple[float, float]]]  # labels -> [(t, value)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    record = sub.add_parser("record", help="scrape /metrics into a JSON-lines file")
    record.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    record.add_argument("--seconds", type=float, required=True)
    record.add_argument("--interval", type=float, default=5.0)
    record.add_argument("--out", type=Path, required=True)
    render = sub.add_parser("render", help="draw the dashboard's panels from recorded scrapes")
    render.add_argument("--scrapes", type=Path, required=True)
    render.add_argument("--out", type=Path, required=True)
    render.add_argument("--dashboard", type=Path, default=DASHBOARD)


def run(args: argparse.Namespace) -> int:
    if args.action == "record":
        count = record(args.base_url, args.seconds, args.interval, args.out)
        print(f"{count} scrapes -> {args.out}")
        return 0
    render(load_scrapes(args.scrapes), json.loads(args.dashboard.read_text()), args.out)
    print(f"dashboard -> {args.out}")
    return 0


# --- recording ----------------------------------------------------------------------------
def record(base_url: str, seconds: float, interval: float, out: Path) -> int:
    """Scrapes until ``seconds`` have passed; a failed scrape is skipped (as Prometheus
    records a down target), not fatal."""
    out.parent.mkdir(parents=True, exist_ok=True)
    count, end = 0, time.monotonic() + seconds
    with open(out, "w") as handle, httpx.Client(timeout=10) as client:
        while time.monotonic() < end:
            started = time.monotonic()
            try:
                text = client.get(f"{base_url.rstrip('/')}/metrics").text
            except httpx.HTTPError:
                text = None
            if text is not None:
                handle.write(json.dumps({"t": time.time(), "text": text}) + "\n")
                handle.flush()
                count += 1
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    return count


def load_scrapes(path: Path) -> dict[str, Series]:
    """Every sample of every scrape: name -> labels -> [(t, value)]."""
    samples: dict[str, Series] = defaultdict(lambda: defaultdict(list))
    for line in path.read_text().splitlines():
        scrape = json.loads(line)
        for family in text_string_to_metric_families(scrape["text"]):
            for sample in family.samples:
                labels = tuple(sorted(sample.labels.items()))
                samples[sample.name][labels].append((scrape["t"], sample.value))
    return samples


# --- the PromQL subset ----------------------------------------------------------------------
_SELECTOR = re.compile(r'\{instance=~"\$instance"\}')
_AGG = re.compile(r"^(sum|max)(?: by \(([\w, ]+)\))? ?\((.+)\)$")
_RANGE = re.compile(r"^(rate|increase)\(([\w:]+)\[(\d+)([sm])\]\)$")
_QUANTILE = re.compile(r"^histogram_quantile\(([\d.]+), (.+)\)$")
_NAME = re.compile(r"^[\w:]+$")


@dataclass(frozen=True)
class Query:
    """A parsed dashboard query: evaluates to {labels: [(t, value)]} on recorded samples."""

    text: str

    def evaluate(self, samples: dict[str, Series]) -> Series:
        return _evaluate(_SELECTOR.sub("", self.text).strip(), samples)


def _split_division(text: str) -> tuple[str, str] | None:
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and text[i:i + 3] == " / ":
            return text[:i], text[i + 3:]
    return None


def _evaluate(text: str, samples: dict[str, Series]) -> Series:
    division = _split_division(text)
    if division is not None:
        numerator, denominator = (_evaluate(part, samples) for part in division)
        return {labels: _divide(points, denominator.get(labels, []))
                for labels, points in numerator.items()}
    match = _QUANTILE.match(text)
    if match:
        return _quantile(float(match.group(1)), _evaluate(match.group(2), samples))
    match = _AGG.match(text)
    if match:
        how, by, inner = match.groups()
        keep = tuple(name.strip() for name in by.split(",")) if by else ()
        return _aggregate(how, keep, _evaluate(inner, samples))
    match = _RANGE.match(text)
    if match:
        function, name, amount, unit = match.groups()
        window = float(amount) * (60 if unit == "m" else 1)
        return {labels: _over_window(points, window, function == "rate")
                for labels, points in samples.get(name, {}).items()}
    if _NAME.match(text):
        return dict(samples.get(text, {}))
    raise ValueError(f"query outside the dashboard's PromQL subset: {text!r}")


def _over_window(points: list[tuple[float, float]], window: float, per_second: bool
                 ) -> list[tuple[float, float]]:
    """Prometheus' rate/increase without extrapolation: the counter's rise over the
    samples inside each window (a reset counts from zero)."""
    result = []
    for i, (t, _) in enumerate(points):
        inside = [(s, v) for s, v in points[:i + 1] if s >= t - window]
        if len(inside) < 2:
            continue
        rise = sum(b - a if b >= a else b
                   for (_, a), (_, b) in itertools.pairwise(inside))
        span = inside[-1][0] - inside[0][0]
        result.append((t, rise / span if per_second else rise * window / span))
    return result


def _aggregate(how: str, keep: tuple[str, ...], series: Series) -> Series:
    grouped: dict[Labels, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for labels, points in series.items():
        key = tuple((name, value) for name, value in labels if name in keep)
        for t, value in points:
            grouped[key][t].append(value)
    combine = sum if how == "sum" else max
    return {key: sorted((t, combine(values)) for t, values in by_time.items())
            for key, by_time in grouped.items()}


def _divide(numerator: list[tuple[float, float]], denominator: list[tuple[float, float]]
            ) -> list[tuple[float, float]]:
    below = dict(denominator)
    return [(t, value / below[t]) for t, value in numerator if below.get(t)]


def _quantile(q: float, buckets: Series) -> Series:
    """histogram_quantile over ``le``-labelled cumulative rates, interpolated linearly
    within the bucket, as Prometheus does."""
    by_time: dict[float, list[tuple[float, float]]] = defaultdict(list)
    for labels, points in buckets.items():
        bound = float(dict(labels)["le"])
        for t, value in points:
            by_time[t].append((bound, value))
    result = []
    for t, cumulative in sorted(by_time.items()):
        cumulative.sort()
        total = cumulative[-1][1]
        if total <= 0:
            continue
        rank, lower, below = q * total, 0.0, 0.0
        for bound, count in cumulative:
            if count >= rank:
                if math.isinf(bound):
                    value = lower
                else:
                    value = lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
                result.append((t, value))
                break
            lower, below = bound, count
    return {(): result}


# --- rendering ---------------------------------------------------------------------------
def _legend(template: str, labels: Labels) -> str:
    values = dict(labels)
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values.get(m.group(1), ""), template)


def render(samples: dict[str, Series], dashboard: dict, out: Path) -> None:
    """One subplot per panel, laid out as the dashboard's grid (two columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = dashboard["panels"]
    start = min((p[0][0] for series in samples.values() for p in series.values() if p),
                default=0.0)
    rows = (len(panels) + 1) // 2
    figure, axes = plt.subplots(rows, 2, figsize=(14, 3.0 * rows), squeeze=False)
    for axis, panel in zip(axes.flat, panels, strict=False):
        for target in panel["targets"]:
            for labels, points in sorted(Query(target["expr"]).evaluate(samples).items()):
                if points:
                    axis.plot([(t - start) / 60 for t, _ in points], [v for _, v in points],
                              label=_legend(target["legendFormat"], labels) or "value")
        unit = panel["fieldConfig"]["defaults"].get("unit", "")
        axis.set_title(panel["title"], fontsize=10)
        axis.set_xlabel("minutes", fontsize=8)
        axis.set_ylabel({"s": "seconds", "percentunit": "fraction", "reqps": "req/s"}
                        .get(unit, ""), fontsize=8)
        axis.set_ylim(bottom=0)
        axis.tick_params(labelsize=8)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7, loc="upper left")
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(dashboard["title"] + " (panels rendered from recorded /metrics scrapes)")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)
    plt.close(figure)
