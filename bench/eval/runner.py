"""Send items through an OpenAI-compatible server; append one JSONL line per item.

Resumable: items whose id is already in their output file are skipped (``retry_failed``
redoes those recorded with an error; the newest line of an id wins). Retries are the
openai client's (``max_retries``): a request that fails transiently (connection, timeout,
408/409/429, 5xx) is retried with its exponential backoff, honouring ``Retry-After``; a
request the server rejects (other 4xx) or that still fails is written with its error and
counted as wrong, never dropped.
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.eval.datasets import LETTERS, Item
from bench.eval.extract import answers_match, last_boxed, last_letter, last_number, normalize_boxed
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
        """The request's ``kad`` object (parameter under the rule's own name)."""
        if self.rule is None:
            return None
        from kad_kernels.rules import RULE_SPECS

        name = RULE_SPECS[self.rule].param
        return {"rule": self.rule, **({name: self.param} if name else {})}


@dataclass(frozen=True)
class RequestOptions:
    """What every request of a run shares (the paper samples at temperature 0.7)."""

    model: str
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float | None = None
    seed: int = 0


@dataclass(frozen=True)
class Job:
    """One item under one setting, written to ``out``."""

    task: str
    setting: Setting
    item: Item
    out: Path


def extract(item: Item, text: str) -> str | None:
    if item.kind == "choice":
        return last_letter(text, LETTERS[: len(item.choices)])
    if item.kind == "boxed":
        return normalize_boxed(last_boxed(text))
    return last_number(text)


def load_records(path: Path) -> dict[str, dict[str, Any]]:
    """id -> newest record; a line cut by an interrupted run is ignored (its item is redone)."""
    records: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            records[record["id"]] = record
        except (ValueError, KeyError, TypeError):
            continue
    return records


def done_ids(path: Path, retry_failed: bool = False) -> set[str]:
    """Ids to skip: every recorded item, or only the successful ones with ``retry_failed``."""
    return {i for i, r in load_records(path).items() if not (retry_failed and r.get("error"))}


def _repair_tail(path: Path) -> None:
    """End the file with a newline so a line cut by a crash cannot swallow the next record."""
    if path.exists() and path.stat().st_size:
        with path.open("rb+") as handle:
            handle.seek(-1, 2)
            if handle.read(1) != b"\n":
                handle.write(b"\n")


def _attempts(exc: BaseException) -> int:
    """Requests the client sent before giving up: its last one says how many retries
    preceded it (openai's ``x-stainless-retry-count`` header)."""
    request = getattr(exc, "request", None)
    try:
        return int(request.headers.get("x-stainless-retry-count", 0)) + 1
    except (AttributeError, TypeError, ValueError):
        return 1


def _item_seed(base: int, item_id: str) -> int:
    """A fixed seed per item: reruns sample the same output, items differ from each other."""
    return (base * 1_000_003 + zlib.crc32(item_id.encode())) % 2**31


async def request_item(client: Any, job: Job, options: RequestOptions) -> dict[str, Any]:
    """Ask the server (the client retries transient failures); return the record to write
    (never raises)."""
    item, setting = job.item, job.setting
    chat = messages(item)
    record: dict[str, Any] = {
        "id": item.id, "task": job.task, "setting": setting.label, "rule": setting.rule,
        "param": setting.param, "prompt": chat[-1]["content"], "gold": item.gold,
    }
    extra: dict[str, Any] = {"kad": setting.kad()} if setting.rule else {}
    sampling: dict[str, Any] = {"temperature": options.temperature,
                                "seed": _item_seed(options.seed, item.id)}
    if options.top_p is not None:
        sampling["top_p"] = options.top_p
    started = time.perf_counter()
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=options.model, messages=chat, max_tokens=options.max_tokens,
            extra_body=extra or None, **sampling,
        )
        response = raw.parse()
    except Exception as exc:  # noqa: BLE001 - recorded, never dropped
        record.update(output=None, extracted=None, correct=False, kad=None,
                      error=f"{type(exc).__name__}: {exc}", attempts=_attempts(exc))
        return record
    seconds = time.perf_counter() - started
    choice = response.choices[0]
    text = choice.message.content or ""
    answer = extract(item, text)
    usage = response.usage
    tokens = usage.completion_tokens if usage else None
    record.update(
        output=text, extracted=answer, correct=answers_match(item.kind, answer, item.gold),
        finish_reason=choice.finish_reason,
        prompt_tokens=usage.prompt_tokens if usage else None, completion_tokens=tokens,
        seconds=seconds, tokens_per_s=tokens / seconds if tokens and seconds else None,
        kad=(response.model_extra or {}).get("kad"), error=None,
        attempts=raw.retries_taken + 1,
    )
    return record


async def run_jobs(client: Any, jobs: list[Job], options: RequestOptions, concurrency: int,
                   progress: Any = None) -> None:
    """Run every job with at most ``concurrency`` requests in flight, appending as they end."""
    limit = asyncio.Semaphore(concurrency)
    locks: dict[Path, asyncio.Lock] = {}
    for out in {job.out for job in jobs}:
        out.parent.mkdir(parents=True, exist_ok=True)
        _repair_tail(out)
        locks[out] = asyncio.Lock()

    async def one(job: Job) -> None:
        async with limit:
            record = await request_item(client, job, options)
        async with locks[job.out]:
            with job.out.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        if progress is not None:
            progress.update(1)

    await asyncio.gather(*(one(job) for job in jobs))
