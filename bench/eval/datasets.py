"""Evaluation items from the usual file formats of each benchmark.

Every loader returns ``Item``s with a stable id (so runs resume), the question as shown
to the model, the gold answer in comparable form and how answers are extracted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from bench.eval.extract import normalize_boxed, normalize_number

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Item:
    id: str
    question: str
    gold: str
    kind: str  # "number" | "boxed" | "choice"
    choices: tuple[str, ...] = field(default=())


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _records(path: Path) -> list[dict]:
    text = path.read_text().strip()
    return json.loads(text) if text.startswith("[") else _jsonl(path)


def load_gsm8k(path: Path) -> list[Item]:
    items = []
    for i, row in enumerate(_jsonl(path)):
        gold = str(row["answer"]).split("####")[-1]
        items.append(Item(f"gsm8k-{i}", row["question"], normalize_number(gold), "number"))
    return items


def load_svamp(path: Path) -> list[Item]:
    items = []
    for i, row in enumerate(_records(path)):
        question = f"{row['Body'].strip()} {row['Question'].strip()}".strip()
        items.append(Item(str(row.get("ID", f"svamp-{i}")), question,
                          normalize_number(row["Answer"]), "number"))
    return items


def load_question_answer(path: Path) -> list[Item]:
    """Any JSONL with ``question`` and a numeric ``answer`` (GSM8K-style ``####`` allowed)."""
    items = []
    for i, row in enumerate(_records(path)):
        gold = str(row["answer"]).split("####")[-1]
        items.append(Item(str(row.get("id", f"{path.stem}-{i}")), row["question"],
                          normalize_number(gold), "number"))
    return items


def load_math500(path: Path) -> list[Item]:
    return [Item(str(row.get("unique_id", f"math-{i}")), row["problem"],
                 normalize_boxed(str(row["answer"])), "boxed")
            for i, row in enumerate(_records(path))]


def _choices(row: dict) -> tuple[list[str], list[str]]:
    """(labels, texts) from ARC/CSQA's original or Hugging Face layouts."""
    question = row["question"]
    raw = question["choices"] if isinstance(question, dict) else row["choices"]
    if isinstance(raw, dict):  # HF datasets: {"label": [...], "text": [...]}
        return list(raw["label"]), list(raw["text"])
    return [c["label"] for c in raw], [c["text"] for c in raw]


def load_multiple_choice(path: Path, prefix: str) -> list[Item]:
    """ARC-Challenge and CommonsenseQA: original JSONL or Hugging Face export."""
    items = []
    for i, row in enumerate(_records(path)):
        labels, texts = _choices(row)
        stem = row["question"]["stem"] if isinstance(row["question"], dict) else row["question"]
        letters = LETTERS[: len(texts)]
        key = str(row["answerKey"])
        gold = letters[labels.index(key)] if key in labels else key
        items.append(Item(str(row.get("id", f"{prefix}-{i}")), stem, gold, "choice",
                          tuple(texts)))
    return items


def load_truthfulqa(path: Path) -> list[Item]:
    """TruthfulQA multiple choice (``mc1_targets``: choice -> 1 for the true one)."""
    items = []
    for i, row in enumerate(_records(path)):
        targets = row["mc1_targets"]
        if isinstance(targets, dict) and "choices" in targets:
            texts, scores = list(targets["choices"]), list(targets["labels"])
        else:
            texts, scores = list(targets), list(targets.values())
        gold = LETTERS[scores.index(1)]
        items.append(Item(f"tqa-{i}", row["question"], gold, "choice", tuple(texts)))
    return items


LOADERS = {
    "gsm8k": (load_gsm8k, "gsm8k/test.jsonl"),
    "svamp": (load_svamp, "svamp/SVAMP.json"),
    "math500": (load_math500, "math500/test.jsonl"),
    "arc": (lambda p: load_multiple_choice(p, "arc"), "arc/ARC-Challenge-Test.jsonl"),
    "csqa": (lambda p: load_multiple_choice(p, "csqa"), "csqa/dev_rand_split.jsonl"),
    "truthfulqa": (load_truthfulqa, "truthfulqa/mc_task.json"),
}


def default_data_dir() -> Path:
    """``$KAD_EVAL_DATA_DIR``, else ``../shared/data`` next to the checkout, else ``data``."""
    if os.environ.get("KAD_EVAL_DATA_DIR"):
        return Path(os.environ["KAD_EVAL_DATA_DIR"])
    shared = Path(__file__).resolve().parents[3] / "shared" / "data"
    return shared if shared.exists() else Path("data")


def load_task(task: str, data_dir: Path, data: Path | None = None) -> list[Item]:
    if task not in LOADERS and data is None:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(LOADERS)} (or --data FILE)")
    if data is not None and task not in LOADERS:
        return load_question_answer(data)
    loader, default = LOADERS[task]
    return loader(data or data_dir / default)
