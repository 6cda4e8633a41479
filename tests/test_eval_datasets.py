"""Loaders on hand-written samples of each benchmark's file formats; the paper's prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.eval.datasets import (
    Item,
    default_data_dir,
    load_gsm8k,
    load_math500,
    load_multiple_choice,
    load_question_answer,
    load_svamp,
    load_task,
    load_truthfulqa,
)
from bench.eval.prompts import messages

DATA = Path(__file__).parent / "data"


def test_gsm8k_jsonl_and_json_list():
    items = load_gsm8k(DATA / "gsm8k_sample.jsonl")
    assert [i.gold for i in items] == ["18", "1200"]  # '#### 1,200' loses its comma
    assert items[0].id == "gsm8k-0" and items[0].kind == "number"
    assert items[0].question.startswith("Janet's ducks")
    assert [i.gold for i in load_gsm8k(DATA / "gsm8k_hf_sample.json")] == ["3"]


def test_svamp_original_and_hf_export():
    original = load_svamp(DATA / "svamp_sample.json")
    assert original[0].id == "chal-1" and original[0].gold == "51"
    assert original[0].question == ("Each pack of dvds costs 76 dollars. If there is a discount "
                                    "of 25 dollars on each pack How much do you have to pay to "
                                    "buy each pack?")
    hf = load_svamp(DATA / "svamp_hf_sample.jsonl")
    assert hf[0].gold == "145" and hf[0].question.endswith("each group of bananas?")


def test_math500():
    items = load_math500(DATA / "math500_sample.jsonl")
    assert items[0].id == "test/prealgebra/1.json"
    assert items[0].gold == r"\frac{1}{2}" and items[0].kind == "boxed"  # from \dfrac{1}{2}


def test_arc_original_and_hf_layouts():
    items = load_multiple_choice(DATA / "arc_sample.jsonl", "arc")
    assert items[0].id == "Mercury_1" and items[0].gold == "C"
    assert items[0].choices == ("lower density", "longer years", "shorter days",
                                "stronger gravity")
    assert items[1].gold == "B" and items[1].choices[1] == "whale"  # labels 1-4 -> A-D


def test_commonsenseqa_original_and_hf_layouts():
    original = load_multiple_choice(DATA / "csqa_sample.jsonl", "csqa")
    assert original[0].gold == "A" and len(original[0].choices) == 5
    assert original[0].question.startswith("A revolving door")
    hf = load_multiple_choice(DATA / "csqa_hf_sample.jsonl", "csqa")
    assert [i.gold for i in hf] == ["A", "B"]
    assert hf[1].choices[1] == "bookstore" and hf[1].kind == "choice"


def test_truthfulqa_both_layouts_shuffled_deterministically():
    items = load_truthfulqa(DATA / "truthfulqa_hf_sample.jsonl")
    truths = ["Nauru is the smallest", "People in the US have the shortest",
              "The watermelon seeds pass through"]
    for item, truth in zip(items, truths, strict=True):
        assert item.choices["ABCDEFGH".index(item.gold)].startswith(truth)
    # The files list the true answer first; the fixed shuffle must move it somewhere else.
    assert {i.gold for i in items} != {"A"}
    assert load_truthfulqa(DATA / "truthfulqa_hf_sample.jsonl") == items
    unshuffled = load_truthfulqa(DATA / "truthfulqa_hf_sample.jsonl", shuffle=False)
    assert [i.gold for i in unshuffled] == ["A", "A", "A"]
    original = load_truthfulqa(DATA / "truthfulqa_sample.json")
    assert original[0].choices["ABC".index(original[0].gold)] == "The seeds pass through you."
    assert sorted(original[0].choices) == sorted(
        ["The seeds pass through you.", "You grow watermelons.", "You die."])


def test_question_answer_jsonl():
    items = load_question_answer(DATA / "qa_sample.jsonl")
    assert items == [Item("q1", "What is 2 + 2?", "4", "number")]


def test_task_files_found_through_the_data_dir(tmp_path, monkeypatch):
    for task, name, sample in [("gsm8k", "test.jsonl", "gsm8k_sample.jsonl"),
                               ("svamp", "SVAMP.json", "svamp_sample.json")]:
        (tmp_path / task).mkdir()
        (tmp_path / task / name).write_text((DATA / sample).read_text())
    monkeypatch.setenv("KAD_EVAL_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    assert [i.gold for i in load_task("gsm8k", default_data_dir())] == ["18", "1200"]
    assert load_task("svamp", default_data_dir())[0].gold == "51"
    assert load_task("arc", tmp_path, DATA / "arc_sample.jsonl")[0].gold == "C"
    assert load_task("mine", tmp_path, DATA / "qa_sample.jsonl")[0].gold == "4"
    with pytest.raises(ValueError, match="unknown task"):
        load_task("nope", tmp_path)
    with pytest.raises(FileNotFoundError, match="math500"):
        load_task("math500", tmp_path)


def test_default_data_dir_is_the_shared_data_next_to_the_checkout(monkeypatch):
    monkeypatch.delenv("KAD_EVAL_DATA_DIR", raising=False)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    assert default_data_dir() == (shared if shared.exists() else Path("data"))


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared" / "data").exists(),
                    reason="no ../shared/data next to this checkout")
def test_shipped_gsm8k_and_svamp_load_completely(monkeypatch):
    monkeypatch.delenv("KAD_EVAL_DATA_DIR", raising=False)
    gsm8k, svamp = load_task("gsm8k", default_data_dir()), load_task("svamp", default_data_dir())
    assert (len(gsm8k), len(svamp)) == (1319, 1000)
    assert gsm8k[0].gold == "18" and svamp[0].gold == "51"
    assert all(i.gold is not None for i in gsm8k + svamp)
    assert len({i.id for i in gsm8k}) == 1319 and len({i.id for i in svamp}) == 1000


def test_multiple_choice_prompt_is_the_papers_appendix_layout():
    item = Item("x", "What will happen if a planet speeds up in rotation?", "C", "choice", (
        "Planetary density will decrease.", "Planetary years will become longer.",
        "Planetary days will become shorter.", "Planetary gravity will become stronger."))
    (message,) = messages(item)
    assert message["role"] == "user"
    assert message["content"] == (
        "Choose the correct answer to the following multiple-choice question.\n\n"
        "What will happen if a planet speeds up in rotation?\n\n"
        "A). Planetary density will decrease.\nB). Planetary years will become longer.\n"
        "C). Planetary days will become shorter.\nD). Planetary gravity will become stronger."
        "\n\nProvide your reasoning about the answer and finish your answer with the letter "
        "corresponding to the correct option (e.g., A, B, C, or D).\n\n")


def test_math_prompts_ask_for_the_final_number_or_a_box():
    (number,) = messages(Item("n", "How many?", "3", "number"))
    assert number["content"].startswith("How many?\n")
    assert "final number" in number["content"]
    (boxed,) = messages(Item("m", "Simplify $x$.", "x", "boxed"))
    assert "\\boxed{}" in boxed["content"]
    json.dumps([number, boxed])  # plain JSON for the chat endpoint
