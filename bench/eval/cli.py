"""``kad-eval``: accuracy of rule settings on benchmarks, through any OpenAI-compatible server.

    kad-eval --base-url http://127.0.0.1:8000/v1 --task gsm8k --task svamp --limit 50 \\
        --rule base --rule aligned --rule kad_dual --param 0.4 --rule nudging --param 0.4

Rules that take a parameter consume the next ``--param`` in order (paper default when
there is none left). Writes ``OUT/<task>__<setting>.jsonl`` per item and ``OUT/summary.md``
/ ``summary.json``; rerunning skips items already written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from bench.eval.datasets import LOADERS, default_data_dir, load_task
from bench.eval.report import comparison_table, summarize
from bench.eval.runner import Setting, evaluate


def parse_settings(rules: list[str] | None, params: list[float] | None) -> list[Setting]:
    from kad_kernels.rules import RULE_SPECS

    if not rules:
        return [Setting(None)]
    queue = list(params or [])
    settings = []
    for rule in rules:
        if rule not in RULE_SPECS:
            raise SystemExit(f"kad-eval: unknown rule {rule!r}")
        spec = RULE_SPECS[rule]
        if spec.param is None:
            settings.append(Setting(rule))
        else:
            settings.append(Setting(rule, queue.pop(0) if queue else spec.default))
    if queue:
        raise SystemExit(f"kad-eval: {len(queue)} --param value(s) left without a rule")
    return settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kad-eval", description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", help="model name (default: the server's first model)")
    parser.add_argument("--task", action="append", required=True,
                        help=f"one of {', '.join(LOADERS)}, or a name for --data")
    parser.add_argument("--data", type=Path, help="a JSONL file with question/answer fields")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--rule", action="append")
    parser.add_argument("--param", action="append", type=float)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--retries", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/eval"))
    parser.add_argument("--no-progress", action="store_true")
    return parser


async def _main(args: argparse.Namespace) -> int:
    import openai
    from tqdm import tqdm

    settings = parse_settings(args.rule, args.param)
    data_dir = args.data_dir or default_data_dir()
    tasks = {task: load_task(task, data_dir, args.data)[: args.limit] for task in args.task}
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0,
                                timeout=600)
    model = args.model or (await client.models.list()).data[0].id
    total = sum(len(items) for items in tasks.values()) * len(settings)
    progress = tqdm(total=total, disable=args.no_progress, desc="kad-eval", file=sys.stderr)
    summaries: dict[str, dict[str, dict]] = {}
    for setting in settings:
        for task, items in tasks.items():
            out = args.out / f"{task}__{setting.slug}.jsonl"
            progress.update(len(items) - len([i for i in items if i.id not in _ids(out)]))
            await evaluate(client, model, items, setting, out, args.concurrency,
                           args.max_tokens, args.retries, progress, args.temperature)
            summaries.setdefault(setting.label, {})[task] = summarize(out)
    progress.close()
    table = comparison_table(summaries, list(tasks))
    (args.out / "summary.md").write_text(table + "\n")
    (args.out / "summary.json").write_text(json.dumps(summaries, indent=2))
    print(table)
    return 0


def _ids(path: Path) -> set[str]:
    from bench.eval.runner import done_ids

    return done_ids(path)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(_main(build_parser().parse_args(argv)))
