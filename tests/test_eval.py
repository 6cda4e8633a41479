"""kad-eval: answer extraction, loaders, sweeps against a live (fake-engine) server, resume,
retries; plots are valid PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_engine import FakeEngine
from serving import ServerThread
from waiting import wait_ready

from bench.eval import cli as eval_cli
from bench.eval.datasets import (
    load_gsm8k,
    load_math500,
    load_multiple_choice,
    load_question_answer,
    load_svamp,
    load_truthfulqa,
)
from bench.eval.extract import last_boxed, last_letter, last_number, normalize_boxed
from bench.eval.report import wilson
from bench.plots import plot_acceptance, plot_throughput
from server.app import create_app
from server.config import ServeConfig

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize(("text", "expected"), [
    ("The answer is 1,234.", "1234"),
    ("so -7 apples", "-7"),
    ("costs $3.50 each, total 10.0", "10"),
    ("0.25 then 0.5", "0.5"),
    ("first 12, then 18, finally 2,500,000", "2500000"),
    ("no digits here", None),
    ("answer: .75", "0.75"),
])
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_last_boxed_with_nested_braces():
    assert last_boxed(r"a \boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{ {a}_{b} }") == "{a}_{b}"
    assert last_boxed("none") is None and last_boxed(r"\boxed{open") is None
    assert normalize_boxed(r"\dfrac{3}{4}") == r"\frac{3}{4}" == normalize_boxed(r"\frac{3}{4}")
    assert normalize_boxed("12.0") == "12"


def test_last_letter_among_options():
    assert last_letter("A is wrong, B maybe, so the answer is C.") == "C"
    assert last_letter("I think (D). Actually B") == "B"
    assert last_letter("Answer: E", "ABCD") is None
    assert last_letter("A", "ABCD") == "A" and last_letter("none", "ABCD") is None


def test_wilson_interval():
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 0) == (0.0, 0.0)


def test_loaders_on_sample_files():
    gsm = load_gsm8k(DATA / "gsm8k_sample.jsonl")
    assert [i.gold for i in gsm] == ["18", "1200"] and gsm[0].kind == "number"
    svamp = load_svamp(DATA / "svamp_sample.json")
    assert svamp[0].gold == "51" and svamp[0].question.endswith("each pack?")
    math = load_math500(DATA / "math500_sample.jsonl")
    assert math[0].gold == r"\frac{1}{2}" and math[0].kind == "boxed"
    arc = load_multiple_choice(DATA / "arc_sample.jsonl", "arc")
    assert arc[0].gold == "C" and arc[0].choices[2] == "shorter days"
    assert arc[1].gold == "B"  # numeric labels 1-4 mapped to letters
    csqa = load_multiple_choice(DATA / "csqa_sample.jsonl", "csqa")
    assert csqa[0].gold == "A" and len(csqa[0].choices) == 5
    tqa = load_truthfulqa(DATA / "truthfulqa_sample.json")
    assert tqa[0].gold == "A" and len(tqa[0].choices) == 3
    qa = load_question_answer(DATA / "qa_sample.jsonl")
    assert qa[0].gold == "4"


def test_task_files_found_through_the_data_dir(tmp_path, monkeypatch):
    from bench.eval.datasets import default_data_dir, load_task

    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text((DATA / "gsm8k_sample.jsonl").read_text())
    (tmp_path / "svamp").mkdir()
    (tmp_path / "svamp" / "SVAMP.json").write_text((DATA / "svamp_sample.json").read_text())
    monkeypatch.setenv("KAD_EVAL_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    assert [i.gold for i in load_task("gsm8k", default_data_dir())] == ["18", "1200"]
    assert load_task("svamp", default_data_dir())[0].gold == "51"
    with pytest.raises(ValueError, match="unknown task"):
        load_task("nope", tmp_path)


class FlakyEngine(FakeEngine):
    """Fails the first attempt of every request whose prompt mentions 'flaky'."""

    failures = 0

    def generate(self, request_id, prompt_token_ids, sampling, alignment):
        text = self.tokenizer.decode(prompt_token_ids)
        if "flaky" in text and FlakyEngine.failures < 1:
            FlakyEngine.failures += 1
            raise RuntimeError("transient")
        if "always-broken" in text:
            raise RuntimeError("broken")
        return super().generate(request_id, prompt_token_ids, sampling, alignment)


@pytest.fixture(scope="module")
def eval_server(tiny_pair):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_pair.draft)
    config = ServeConfig.model_validate({
        "models": {"target": "x", "draft": "x", "served_model_name": "kad-eval-test"},
        "engine": {"max_model_len": 512},
    })
    thread = ServerThread(create_app(config, lambda c: FlakyEngine(c, tokenizer)))
    wait_ready(thread.url)
    yield thread
    thread.stop()


def test_sweep_resume_and_failures(eval_server, tmp_path, capsys):
    data = tmp_path / "items.jsonl"
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(4)]
    rows.append({"question": "flaky always-broken question", "answer": "1"})
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    argv = ["--base-url", f"{eval_server.url}/v1", "--task", "toy", "--data", str(data),
            "--rule", "base", "--rule", "kad_dual", "--param", "0.3", "--out", str(out),
            "--max-tokens", "8", "--retries", "1", "--no-progress"]
    assert eval_cli.main(argv) == 0
    table = (out / "summary.md").read_text()
    assert "| base |" in table and "| kad_dual 0.3 |" in table and "avg" in table
    lines = [json.loads(l) for l in (out / "toy__kad_dual_0.3.jsonl").read_text().splitlines()]
    assert len(lines) == 5
    broken = [l for l in lines if l["error"]]
    assert len(broken) == 1 and broken[0]["correct"] is False
    assert all(l["kad"]["rule"] == "kad_dual" for l in lines if not l["error"])
    assert {"prompt", "output", "extracted", "gold", "correct", "kad"} <= set(lines[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base"]["toy"]["items"] == 5 and summary["base"]["toy"]["errors"] == 1
    # Resume: nothing is sent again; the files do not grow.
    before = (out / "toy__base.jsonl").read_text()
    assert eval_cli.main(argv) == 0
    assert (out / "toy__base.jsonl").read_text() == before


def test_plots_are_png(tmp_path):
    records = [
        {"system": "kad:kad_dual:0.4", "gamma": g, "concurrency": c, "tokens_per_s": 10.0 * c,
         "acceptance_rate": 0.5 + 0.01 * g, "rule": "kad_dual", "param": 0.4}
        for g in (3, 5, 7) for c in (1, 16)
    ] + [{"system": "vllm-ar", "gamma": None, "concurrency": 1, "tokens_per_s": 5.0,
          "acceptance_rate": None, "rule": None, "param": None}]
    for plot, name in ((plot_acceptance, "a.png"), (plot_throughput, "t.png")):
        plot(records, tmp_path / name)
        content = (tmp_path / name).read_bytes()
        assert content.startswith(b"\x89PNG\r\n\x1a\n") and len(content) > 5000
