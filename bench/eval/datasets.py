"""Evaluation items from the usual file formats of each benchmark.

Every loader returns ``Item``s with a stable id (so runs resume), the question as shown
to the model, the gold answer in canonical form and how answers are extracted. Accepted
formats: the benchmarks' original releases and their Hugging Face exports written with
``Dataset.to_json`` (JSON Lines) or as a JSON list.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.eval.extract import normalize_boxed, normalize_number

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Item:
    id: str
    question: str
    gold: str
    kind: str  # "number" | "boxed" | "choice"
    choices: tuple[str, ...] = field(default=())


def _records(path: Path) -> list[dict[str, Any]]:
    """A JSON list, one JSON object (``{"data": [...]}`` or a single record) or JSON Lines."""
    text = path.read_text(encoding="utf-8").strip()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(whole, dict):
        return whole["data"] if isinstance(whole.get("data"), list) else [whole]
    return whole


def _gsm8k_gold(answer: Any) -> str | None:
    """GSM8K keeps the reasoning before ``#### <number>``; plain numbers pass through."""
    return normalize_number(str(answer).split("####")[-1])


def load_gsm8k(path: Path) -> list[Item]:
    """GSM8K ``test.jsonl`` (``question``, ``answer`` ending in ``#### N``)."""
    return [Item(str(row.get("id", f"gsm8k-{i}")), row["question"], _gsm8k_gold(row["answer"]),
                 "number") for i, row in enumerate(_records(path))]


def load_svamp(path: Path) -> list[Item]:
    """SVAMP ``SVAMP.json`` (``ID``, ``Body``, ``Question``, float ``Answer``), or its HF export."""
    items = []
    for i, row in enumerate(_records(path)):
        if "question_concat" in row:
            question = row["question_concat"].strip()
        else:
            question = f"{row['Body'].strip()} {row['Question'].strip()}".strip()
        items.append(Item(str(row.get("ID", f"svamp-{i}")), question,
                          normalize_number(row["Answer"]), "number"))
    return items


def load_question_answer(path: Path) -> list[Item]:
    """Any JSONL with ``question`` and a numeric ``answer`` (GSM8K-style ``####`` allowed)."""
    return [Item(str(row.get("id", f"{path.stem}-{i}")), row["question"],
                 _gsm8k_gold(row["answer"]), "number") for i, row in enumerate(_records(path))]


def load_math500(path: Path) -> list[Item]:
    """MATH500 (``problem``, ``answer``, ``unique_id``; HuggingFaceH4/MATH-500 layout)."""
    return [Item(str(row.get("unique_id", f"math-{i}")), row["problem"],
                 normalize_boxed(str(row["answer"])), "boxed")
            for i, row in enumerate(_records(path))]


def _choices(row: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(labels, texts) from ARC/CSQA's original or Hugging Face layouts."""
    question = row["question"]
    raw = question["choices"] if isinstance(question, dict) else row["choices"]
    if isinstance(raw, dict):  # HF datasets: {"label": [...], "text": [...]}
        return [str(label) for label in raw["label"]], list(raw["text"])
    return [str(c["label"]) for c in raw], [c["text"] for c in raw]


def load_multiple_choice(path: Path, prefix: str) -> list[Item]:
    """ARC-Challenge and CommonsenseQA: original JSONL or Hugging Face export.

    Options are relabelled A, B, C, ... in their given order (ARC uses 1-4 on some items).
    """
    items = []
    for i, row in enumerate(_records(path)):
        labels, texts = _choices(row)
        stem = row["question"]["stem"] if isinstance(row["question"], dict) else row["question"]
        key = str(row["answerKey"])
        gold = LETTERS[labels.index(key)] if key in labels else key
        items.append(Item(str(row.get("id", f"{prefix}-{i}")), stem, gold, "choice",
                          tuple(texts)))
    return items


def _shuffled(texts: list[str], scores: list[int], key: str) -> tuple[list[str], list[int]]:
    """TruthfulQA lists the true answer first: a fixed per-question shuffle hides it."""
    order = list(range(len(texts)))
    random.Random(int(hashlib.sha256(key.encode()).hexdigest()[:16], 16)).shuffle(order)
    return [texts[j] for j in order], [scores[j] for j in order]


def load_truthfulqa(path: Path, shuffle: bool = True) -> list[Item]:
    """TruthfulQA multiple choice, ``mc1_targets``: original ``{choice: 0/1}`` or HF layout.

    The options are shuffled with a seed derived from the question (same order every run).
    """
    items = []
    for i, row in enumerate(_records(path)):
        targets = row["mc1_targets"]
        if isinstance(targets, dict) and "choices" in targets:
            texts, scores = list(targets["choices"]), [int(s) for s in targets["labels"]]
        else:
            texts, scores = list(targets), [int(s) for s in targets.values()]
        if shuffle:
            texts, scores = _shuffled(texts, scores, row["question"])
        items.append(Item(f"tqa-{i}", row["question"], LETTERS[scores.index(1)], "choice",
                          tuple(texts)))
    return items


# task -> (loader, file under the data dir)
LOADERS: dict[str, tuple[Callable[[Path], list[Item]], str]] = {
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
    """Items of a known task (from ``data`` if given, else the data dir), or of a
    question/answer JSONL named ``task``."""
    if task not in LOADERS and data is None:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(LOADERS)} (or --data FILE)")
    if task not in LOADERS:
        return load_question_answer(data)
    loader, default = LOADERS[task]
    path = data or data_dir / default
    if not path.exists():
        raise FileNotFoundError(f"{task}: no file at {path} (set --data-dir or --data)")
    return loader(path)
