"""``kad-bench serve``: speed of a running server, as its clients see it.

Streams requests through the OpenAI API at each concurrency and rule setting: aggregate
tokens/s, per-request tokens/s, time to first token and the acceptance rate (from the
response's ``kad`` statistics; absent on servers without them). Each (setting,
concurrency) gets warm-up rounds, then ``--repeats`` measured rounds: records hold the
median and the raw repeats. gamma is a server setting: the value the server reports (a
``gamma``/``num_speculative_tokens`` field in ``/v1/models`` or in ``kad``), overridden
by ``--gamma-label``. Records merge into an existing JSON (same system, gamma,
concurrency and task replaced), so runs against servers with different gamma share one
file. ``--task gsm8k --task arc ...`` sends each benchmark's own prompts (the paper's, as
``kad-eval`` sends them) and ``tables.md`` lays the results out like the paper's Tables 4
and 5 (rows = rule x gamma, columns = tasks, plus the average).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.client import openai_base_url

PROMPTS = [
    "Explain why the sky is blue.",
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
     "in May. How many clips did Natalia sell altogether in April and May?"),
    "Write a short story about a lighthouse keeper.",
    "List three prime numbers and explain why they are prime.",
]
GAMMA_KEYS = ("gamma", "num_speculative_tokens")


@dataclass(frozen=True)
class BenchSetting:
    """``kad_dual:0.4`` -> rule and parameter; ``default`` -> no ``kad`` object."""

    rule: str | None
    param: float | None

    @classmethod
    def parse(cls, text: str) -> BenchSetting:
        from kad_kernels.rules import RULE_SPECS

        if text == "default":
            return cls(None, None)
        rule, _, param = text.partition(":")
        if rule not in RULE_SPECS:
            raise SystemExit(f"kad-bench serve: unknown rule {rule!r}")
        spec = RULE_SPECS[rule]
        if param and spec.param is None:
            raise SystemExit(f"kad-bench serve: rule {rule!r} takes no parameter")
        return cls(rule, (float(param) if param else spec.default) if spec.param else None)

    @property
    def system(self) -> str:
        if self.rule is None:
            return "server-default"
        return f"kad:{self.rule}" if self.param is None else f"kad:{self.rule}:{self.param:g}"

    def kad(self) -> dict[str, Any] | None:
        if self.rule is None:
            return None
        from kad_kernels.rules import RULE_SPECS

        name = RULE_SPECS[self.rule].param
        return {"rule": self.rule, **({name: self.param} if name else {})}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                        help="the API root; a bare server address gets /v1 appended")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", help="default: the server's first model")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--settings", nargs="+", default=["kad_dual:0.4"],
                        help="rule[:param] each (paper default when no param), or 'default' "
                             "for requests without a kad object")
    parser.add_argument("--gamma-label", type=int,
                        help="the server's gamma, recorded as given (else what it reports)")
    parser.add_argument("--requests-per-slot", type=int, default=2,
                        help="a round sends concurrency x this many requests")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                        help="let requests stop at end-of-text (lengths then vary)")
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    parser.add_argument("--prompts", type=Path, help="text file, one prompt per line")
    parser.add_argument("--task", action="append",
                        help="use this benchmark's paper prompts (repeatable; kad-eval tasks); "
                             "implies --endpoint chat")
    parser.add_argument("--task-prompts", type=int, default=16,
                        help="first N items of each --task")
    parser.add_argument("--data-dir", type=Path, help="benchmark files (as kad-eval)")
    parser.add_argument("--table-concurrency", type=int,
                        help="concurrency shown in tables.md (default: the lowest measured)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    parser.add_argument("--json-name", default="serve.json")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the JSON instead of merging into it")
    parser.add_argument("--no-plots", action="store_true")


def _gamma_from(mapping: dict[str, Any] | None) -> int | None:
    for key in GAMMA_KEYS:
        if mapping and isinstance(mapping.get(key), int):
            return mapping[key]
    return None


async def one_request(client: Any, args: argparse.Namespace, model: str, prompt: str,
                      kad: dict[str, Any] | None, seed: int) -> dict[str, Any]:
    """One streamed request: tokens, time to first token, total time, ``kad`` stats."""
    extra: dict[str, Any] = {}
    if kad:
        extra["kad"] = kad
    if args.ignore_eos:
        extra["ignore_eos"] = True
    common = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature,
              "seed": seed, "stream": True, "stream_options": {"include_usage": True},
              "extra_body": extra or None}
    start = time.perf_counter()
    if args.endpoint == "chat":
        stream = await client.chat.completions.create(
            messages=[{"role": "user", "content": prompt}], **common)
    else:
        stream = await client.completions.create(prompt=prompt, **common)
    first: float | None = None
    final = None
    async for chunk in stream:
        if chunk.choices and first is None:
            choice = chunk.choices[0]
            text = choice.delta.content if args.endpoint == "chat" else choice.text
            if text:
                first = time.perf_counter() - start
        if chunk.usage is not None:
            final = chunk
    seconds = time.perf_counter() - start
    tokens = final.usage.completion_tokens if final else 0
    stats = (final.model_extra or {}).get("kad") if final else None
    return {"tokens": tokens, "ttft": first, "seconds": seconds, "kad": stats}


async def one_round(client: Any, args: argparse.Namespace, model: str,
                    kad: dict[str, Any] | None, concurrency: int, prompts: list[str],
                    seed0: int) -> dict[str, Any]:
    """``concurrency x requests_per_slot`` requests, at most ``concurrency`` in flight."""
    limit = asyncio.Semaphore(concurrency)

    async def slot(i: int) -> dict[str, Any] | None:
        async with limit:
            try:
                return await one_request(client, args, model, prompts[i % len(prompts)], kad,
                                         seed0 + i)
            except Exception as exc:  # noqa: BLE001 - counted in the record, not fatal
                print(f"kad-bench serve: request failed: {type(exc).__name__}: {exc}",
                      file=sys.stderr)
                return None

    start = time.perf_counter()
    outcomes = await asyncio.gather(*(slot(i) for i in range(concurrency *
                                                              args.requests_per_slot)))
    elapsed = time.perf_counter() - start
    done = [r for r in outcomes if r is not None]
    stats = [r["kad"] for r in done if isinstance(r["kad"], dict)]
    drafted = sum(s.get("drafted_tokens") or 0 for s in stats)
    accepted = sum(s.get("accepted_tokens") or 0 for s in stats)
    alphas = [s["mean_deferred_mass"] for s in stats if s.get("mean_deferred_mass") is not None]
    ttfts = [r["ttft"] for r in done if r["ttft"] is not None]
    per_request = [r["tokens"] / r["seconds"] for r in done if r["seconds"] > 0]
    return {
        "tokens_per_s": sum(r["tokens"] for r in done) / elapsed,
        "per_request_tokens_per_s": statistics.median(per_request) if per_request else None,
        "ttft_s": statistics.median(ttfts) if ttfts else None,
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_deferred_mass": sum(alphas) / len(alphas) if alphas else None,
        "errors": len(outcomes) - len(done),
        "gamma": next((g for g in map(_gamma_from, stats) if g is not None), None),
    }


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def make_record(setting: BenchSetting, concurrency: int, gamma: int | None,
                gamma_reported: int | None, runs: list[dict[str, Any]],
                args: argparse.Namespace, task: str | None = None) -> dict[str, Any]:
    """The shared benchmark record (see ``bench.plots``) plus the serving extras."""
    rates = [r["tokens_per_s"] for r in runs]
    return {
        "system": setting.system, "rule": setting.rule, "param": setting.param,
        "gamma": gamma, "gamma_reported": gamma_reported, "concurrency": concurrency,
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_min": min(rates), "tokens_per_s_max": max(rates),
        "per_request_tokens_per_s": _median([r["per_request_tokens_per_s"] for r in runs]),
        "ttft_s": _median([r["ttft_s"] for r in runs]),
        "acceptance_rate": _median([r["acceptance_rate"] for r in runs]),
        "mean_deferred_mass": _median([r["mean_deferred_mass"] for r in runs]),
        "repeats": rates,
        "ttft_repeats": [r["ttft_s"] for r in runs],
        "acceptance_repeats": [r["acceptance_rate"] for r in runs],
        "errors": sum(r["errors"] for r in runs),
        "requests_per_round": concurrency * args.requests_per_slot,
        "max_tokens": args.max_tokens, "endpoint": args.endpoint, "task": task,
        "source": "serve",
    }


def prompt_sets(args: argparse.Namespace) -> dict[str | None, list[str]]:
    """task -> prompts: the benchmarks' paper prompts, a prompt file, or the built-in ones."""
    if args.task:
        from bench.eval.datasets import default_data_dir, load_task
        from bench.eval.prompts import messages

        args.endpoint = "chat"
        data_dir = args.data_dir or default_data_dir()
        try:
            return {task: [messages(item)[-1]["content"]
                           for item in load_task(task, data_dir)[: args.task_prompts]]
                    for task in args.task}
        except (ValueError, FileNotFoundError) as exc:
            raise SystemExit(f"kad-bench serve: {exc}") from exc
    if args.prompts:
        return {None: [line for line in args.prompts.read_text().splitlines() if line.strip()]}
    return {None: PROMPTS}


async def benchmark(args: argparse.Namespace) -> list[dict[str, Any]]:
    import openai

    sets = prompt_sets(args)
    settings = [BenchSetting.parse(text) for text in args.settings]
    client = openai.AsyncOpenAI(base_url=openai_base_url(args.base_url), api_key=args.api_key, max_retries=0,
                                timeout=args.timeout)
    listing = (await client.models.list()).data
    model = args.model or listing[0].id
    served = next((m for m in listing if m.id == model), None)
    model_gamma = _gamma_from(served.model_extra if served else None)
    records = []
    for task, prompts in sets.items():
        for setting in settings:
            for concurrency in args.concurrency:
                for w in range(args.warmup):
                    await one_round(client, args, model, setting.kad(), concurrency, prompts,
                                    10_000 * (w + 1))
                runs = [await one_round(client, args, model, setting.kad(), concurrency,
                                        prompts, 1_000 * (r + 1)) for r in range(args.repeats)]
                reported = next((r["gamma"] for r in runs if r["gamma"] is not None),
                                model_gamma)
                gamma = args.gamma_label if args.gamma_label is not None else reported
                record = make_record(setting, concurrency, gamma, reported, runs, args, task)
                records.append(record)
                print(format_record(record), flush=True)
    await client.close()
    return records


def format_record(record: dict[str, Any]) -> str:
    def fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
        return "-" if value is None else format(value * scale, spec)

    task = f"{record['task']:<10} " if record.get("task") else ""
    return (f"{task}{record['system']:<24} gamma={record['gamma']!s:<4} "
            f"conc={record['concurrency']:<3} {record['tokens_per_s']:9.1f} tok/s "
            f"[{record['tokens_per_s_min']:.1f}-{record['tokens_per_s_max']:.1f}]  "
            f"per-request {fmt(record['per_request_tokens_per_s'], '.1f')} tok/s  "
            f"ttft {fmt(record['ttft_s'], '.1f', 1e3)} ms  "
            f"acceptance {fmt(record['acceptance_rate'], '.3f')}  errors {record['errors']}")


def merge_records(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` with ``new`` added; a new record replaces one with the same system, gamma,
    concurrency and task."""
    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return r.get("system"), r.get("gamma"), r.get("concurrency"), r.get("task")

    replaced = {key(r) for r in new}
    return [r for r in old if key(r) not in replaced] + new


def tables_markdown(records: list[dict[str, Any]], concurrency: int | None = None) -> str:
    """The paper's Tables 4 (tokens/s) and 5 (acceptance %): rows = system and gamma,
    columns = tasks plus the average, at one concurrency (default: the lowest)."""
    if not records:
        return ""
    level = concurrency if concurrency is not None else min(r["concurrency"] for r in records)
    chosen = [r for r in records if r["concurrency"] == level]
    tasks = sorted({r.get("task") or "-" for r in chosen})
    rows = sorted({(r["system"], r.get("gamma")) for r in chosen},
                  key=lambda row: (row[0], row[1] is None, row[1] or 0))
    cells = {(r["system"], r.get("gamma"), r.get("task") or "-"): r for r in chosen}
    out = []
    for title, key, scale in [("Throughput, tokens/s (Table 4 layout)", "tokens_per_s", 1.0),
                              ("Acceptance rate, % (Table 5 layout)", "acceptance_rate", 100.0)]:
        out += [f"### {title}, concurrency {level}", "",
                "| system | gamma | " + " | ".join(tasks) + " | Avg. |",
                "|" + "---|" * (len(tasks) + 3)]
        for system, gamma in rows:
            values = [(cells.get((system, gamma, t)) or {}).get(key) for t in tasks]
            present = [v * scale for v in values if v is not None]
            if not present:
                continue
            shown = ["-" if v is None else f"{v * scale:.1f}" for v in values]
            out.append(f"| {system} | {'-' if gamma is None else gamma} | "
                       + " | ".join(shown) + f" | {sum(present) / len(present):.1f} |")
        out.append("")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    records = asyncio.run(benchmark(args))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / args.json_name
    if path.exists() and not args.overwrite:
        records = merge_records(json.loads(path.read_text()), records)
    path.write_text(json.dumps(records, indent=2))
    tables = tables_markdown(records, args.table_concurrency)
    (args.out / "tables.md").write_text(tables)
    print(tables)
    written = [str(path), str(args.out / "tables.md")]
    if not args.no_plots:
        from bench.plots import render_all

        written += [str(p) for p in render_all(records, args.out)]
    print("wrote " + ", ".join(written))
    return 0
