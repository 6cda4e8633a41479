"""Benchmark plots: valid, nonblank PNGs from the shared record format (engine or serve)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np

from bench.plots import main as plots_main
from bench.plots import plot_acceptance, plot_throughput, plot_ttft, render_all

PNG = b"\x89PNG\r\n\x1a\n"


def engine_records() -> list[dict]:
    """What ``kad-bench engine --json`` writes: AR, spec-base, KAD rules, reference."""
    records = [{"system": "vllm-ar", "rule": None, "param": None, "gamma": None,
                "concurrency": c, "tokens_per_s": 20.0 * c, "acceptance_rate": None,
                "repeats": [19.0 * c, 20.0 * c, 21.0 * c]} for c in (1, 4, 16, 64)]
    records.append({"system": "reference", "rule": "kad_dual", "param": 0.4, "gamma": None,
                    "concurrency": 1, "tokens_per_s": 5.0, "acceptance_rate": None,
                    "repeats": [5.0]})
    for system, rule, param, base in [("vllm-spec-base", "base", None, 0.9),
                                      ("kad:kad_dual:0.4", "kad_dual", 0.4, 0.75),
                                      ("kad:kad_primal:0.9", "kad_primal", 0.9, 0.72),
                                      ("kad:nudging:0.4", "nudging", 0.4, 0.65)]:
        for gamma in (3, 5, 7):
            for c in (1, 16):
                rate = base - 0.05 * (gamma - 3)
                records.append({"system": system, "rule": rule, "param": param,
                                "gamma": gamma, "concurrency": c,
                                "tokens_per_s": 30.0 * c * rate, "ttft_s": 0.01 * c,
                                "acceptance_rate": rate,
                                "repeats": [29.0 * c * rate, 30.0 * c * rate, 32.0 * c * rate]})
    return records


def assert_drawn_png(path: Path, min_colours: int = 8) -> None:
    """A PNG whose pixels vary (matplotlib drew axes, lines, bars, text into it)."""
    content = path.read_bytes()
    assert content.startswith(PNG) and len(content) > 5000
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    colours = np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)
    assert len(colours) >= min_colours
    assert (pixels[..., :3] < 0.5).any() and (pixels[..., :3] > 0.9).any()


def test_each_plot_is_a_drawn_png(tmp_path):
    records = engine_records()
    for plot, name in [(plot_acceptance, "a.png"), (plot_throughput, "t.png"),
                       (plot_ttft, "f.png")]:
        assert plot(records, tmp_path / name) == tmp_path / name
        assert_drawn_png(tmp_path / name)


def test_acceptance_plot_shows_the_rule_colours(tmp_path):
    """The bars use the paper's Figure 2 colours (dual brown, primal blue, nudging red)."""
    plot_acceptance(engine_records(), tmp_path / "a.png")
    pixels = (matplotlib.image.imread(tmp_path / "a.png")[..., :3] * 255).round()
    for rgb in [(140, 86, 75), (31, 119, 180), (214, 39, 40)]:  # tab:brown, blue, red
        assert (np.abs(pixels - np.array(rgb)).max(axis=-1) <= 2).sum() > 200, rgb


def test_render_all_and_command_line_merge_files(tmp_path, capsys):
    records = engine_records()
    first, second = tmp_path / "g35.json", tmp_path / "g7.json"
    first.write_text(json.dumps([r for r in records if r["gamma"] != 7]))
    second.write_text(json.dumps([r for r in records if r["gamma"] == 7]))
    assert plots_main([str(first), str(second), "--out", str(tmp_path / "plots")]) == 0
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["acceptance.png", "throughput.png", "ttft.png"]
    for name in names:
        assert_drawn_png(tmp_path / "plots" / name)
    assert capsys.readouterr().out.count("wrote ") == 3
    # Without TTFT measurements (the engine benchmark), no TTFT plot.
    no_ttft = [{k: v for k, v in r.items() if k != "ttft_s"} for r in records]
    paths = render_all(no_ttft, tmp_path / "engine")
    assert [p.name for p in paths] == ["acceptance.png", "throughput.png"]


def test_records_without_acceptance_or_spread_still_plot(tmp_path):
    records = [{"system": "vllm-ar", "gamma": None, "concurrency": 1, "tokens_per_s": 5.0,
                "acceptance_rate": None}]
    for plot, name in [(plot_acceptance, "a.png"), (plot_throughput, "t.png")]:
        plot(records, tmp_path / name)
        assert (tmp_path / name).read_bytes().startswith(PNG)
