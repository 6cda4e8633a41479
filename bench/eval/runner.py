"""Send items through an OpenAI-compatible server; append one JSONL line per item.

Resumable: items whose id is already in the output file are skipped. A failing request is
retried with backoff; if it still fails, the item is written with its error (and counted
as wrong), never dropped.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.eval.datasets import Item
from bench.eval.extract import last_boxed, last_letter, last_number, normalize_boxed
from bench.eval.prompts import messages


@dataclass(frozen=True)
class Setting:
    """One row of the comparison table: a rule and its parameter (None: no kad object)."""

    rule: str | None
    param: float | None = None

    @property
    def label(self) -> str:
        if self.rule is None:
            return "server-default"
        return self.rule if self.param is None else f"{self.rule} {self.param:g}"

    @property
    def slug(self) -> str:
        return "default" if self.rule is None else self.label.replace(" ", "_")

    def kad(self) -> dict[str, Any] | None:
        if self.rule is None:
            return None
        from kad_kernels.rules import RULE_SPECS

        name = RULE_SPECS[self.rule].param
        return {"rule": self.rule, **({name: self.param} if name else {})}


def extract(item: Item, text: str) -> str | None:
    if item.kind == "choice":
        return last_letter(text, "ABCDEFGHIJ"[: len(item.choices)])
    if item.kind == "boxed":
        return normalize_boxed(last_boxed(text))
    return last_number(text)


def done_ids(path: Path) -> set[str]:
    if not path.exists():
        return set()
    ids = set()
    for line in path.read_text().splitlines():
        try:
            ids.add(json.loads(line)["id"])
        except (ValueError, KeyError):
            continue  # a line cut by an interrupted run: the item is redone
    return ids


async def evaluate(client, model: str, items: list[Item], setting: Setting, out: Path,
                   concurrency: int, max_tokens: int, retries: int = 3,
                   progress=None, temperature: float = 0.0) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    skip = done_ids(out)
    todo = [item for item in items if item.id not in skip]
    limit = asyncio.Semaphore(concurrency)
    lock = asyncio.Lock()

    async def one(item: Item) -> None:
        async with limit:
            record: dict[str, Any] = {"id": item.id, "setting": setting.label,
                                      "prompt": messages(item)[0]["content"], "gold": item.gold}
            started = time.perf_counter()
            for attempt in range(retries + 1):
                try:
                    extra = {"kad": setting.kad()} if setting.kad() else None
                    response = await client.chat.completions.create(
                        model=model, messages=messages(item), max_tokens=max_tokens,
                        temperature=temperature, seed=0, extra_body=extra,
                    )
                    text = response.choices[0].message.content or ""
                    answer = extract(item, text)
                    record.update(
                        output=text, extracted=answer, correct=answer == item.gold,
                        completion_tokens=response.usage.completion_tokens,
                        seconds=time.perf_counter() - started,
                        kad=(response.model_extra or {}).get("kad"), error=None,
                    )
                    break
                except Exception as exc:  # noqa: BLE001 - recorded, never dropped
                    record.update(output=None, extracted=None, correct=False, kad=None,
                                  error=f"{type(exc).__name__}: {exc}", attempts=attempt + 1)
                    if attempt < retries:
                        await asyncio.sleep(min(8.0, 0.5 * 2**attempt))
            async with lock:
                with out.open("a") as handle:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            if progress is not None:
                progress.update(1)

    await asyncio.gather(*(one(item) for item in todo))
