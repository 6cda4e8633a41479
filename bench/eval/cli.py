"""``kad-eval``: accuracy of rule settings on benchmarks, through any OpenAI-compatible server.

    kad-eval --base-url http://127.0.0.1:8000/v1 --task gsm8k --task svamp --limit 50 \\
        --rule base --rule aligned --rule kad_dual --param 0.3 --param 0.4 \\
        --rule nudging --param 0.4

Each ``--param`` belongs to the ``--rule`` before it; a rule followed by several params
gives one setting per value, a rule with a parameter but no ``--param`` uses the paper's
default. No ``--rule``: requests carry no ``kad`` object (the server's default setting).
Writes ``OUT/<task>__<setting>.jsonl`` per item and ``OUT/summary.md`` / ``summary.json``
(rows = settings, columns = tasks); rerunning skips items already written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from bench.client import openai_base_url
from bench.eval.datasets import LOADERS, Item, default_data_dir, load_task
from bench.eval.report import comparison_table, summarize
from bench.eval.runner import Job, RequestOptions, Setting, done_ids, load_records, run_jobs


class _Ordered(argparse.Action):
    """Keeps ``--rule`` and ``--param`` in command-line order, so params pair with rules."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        ordered = list(getattr(namespace, "ordered_settings", None) or [])
        ordered.append((self.dest, values))
        namespace.ordered_settings = ordered


def parse_settings(ordered: list[tuple[str, Any]] | None) -> list[Setting]:
    """``[("rule", "kad_dual"), ("param", 0.3), ("param", 0.4), ("rule", "base")]`` ->
    ``kad_dual 0.3``, ``kad_dual 0.4``, ``base``."""
    from kad_kernels.rules import RULE_SPECS

    if not ordered:
        return [Setting(None)]
    groups: list[tuple[str, list[float]]] = []
    for kind, value in ordered:
        if kind == "rule":
            if value not in RULE_SPECS:
                raise SystemExit(f"kad-eval: unknown rule {value!r}; known: "
                                 f"{', '.join(RULE_SPECS)}")
            groups.append((value, []))
        elif not groups:
            raise SystemExit("kad-eval: --param must follow the --rule it belongs to")
        else:
            groups[-1][1].append(value)
    settings = []
    for rule, params in groups:
        spec = RULE_SPECS[rule]
        if spec.param is None and params:
            raise SystemExit(f"kad-eval: rule {rule!r} takes no parameter")
        values = params or ([spec.default] if spec.param else [None])
        settings.extend(Setting(rule, value) for value in values)
    duplicates = {s.label for s in settings if settings.count(s) > 1}
    if duplicates:
        raise SystemExit(f"kad-eval: setting(s) given twice: {', '.join(sorted(duplicates))}")
    return settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kad-eval", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                        help="the API root; a bare server address gets /v1 appended")
    parser.add_argument("--api-key", default="none", help="or the server's key")
    parser.add_argument("--model", help="model name (default: the server's first model)")
    parser.add_argument("--task", action="append", required=True,
                        help=f"one of {', '.join(LOADERS)}, or any name together with --data")
    parser.add_argument("--data", type=Path,
                        help="file for the (single) task: its own format, or for a new task "
                             "name a JSONL with question/answer fields")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="benchmark files (default: $KAD_EVAL_DATA_DIR, else "
                             "../shared/data next to the checkout)")
    parser.add_argument("--limit", type=int, help="first N items of each task")
    parser.add_argument("--rule", action=_Ordered, help="a rule setting (repeatable)")
    parser.add_argument("--param", action=_Ordered, type=float,
                        help="parameter of the preceding --rule (repeatable)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="the paper samples at 0.7; 0 for greedy")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0, help="base of the per-item seeds")
    parser.add_argument("--retries", type=int, default=3,
                        help="retries of a transiently failing request (the openai client's "
                             "max_retries, with its exponential backoff)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="on resume, redo items recorded with an error")
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    parser.add_argument("--out", type=Path, default=Path("results/eval"))
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _load_tasks(args: argparse.Namespace) -> dict[str, list[Item]]:
    if args.data is not None and len(args.task) != 1:
        raise SystemExit("kad-eval: --data goes with exactly one --task")
    data_dir = args.data_dir or default_data_dir()
    try:
        return {task: load_task(task, data_dir, args.data)[: args.limit] for task in args.task}
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"kad-eval: {exc}") from exc


def write_summaries(out: Path, settings: list[Setting], tasks: dict[str, list[Item]]) -> str:
    """Summaries of the selected items from the JSONL files (so resumed runs count fully)."""
    summaries: dict[str, dict[str, dict[str, Any]]] = {}
    for setting in settings:
        for task, items in tasks.items():
            records = load_records(out / f"{task}__{setting.slug}.jsonl")
            chosen = [records[item.id] for item in items if item.id in records]
            summaries.setdefault(setting.label, {})[task] = summarize(chosen)
    table = comparison_table(summaries, list(tasks))
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(summaries, indent=2))
    return table


async def _main(args: argparse.Namespace) -> int:
    import openai
    from tqdm import tqdm

    settings = parse_settings(getattr(args, "ordered_settings", None))
    tasks = _load_tasks(args)
    client = openai.AsyncOpenAI(base_url=openai_base_url(args.base_url), api_key=args.api_key,
                                max_retries=args.retries,
                                timeout=args.timeout)
    jobs, total = [], 0
    for setting in settings:
        for task, items in tasks.items():
            out = args.out / f"{task}__{setting.slug}.jsonl"
            skip = done_ids(out, args.retry_failed)
            total += len(items)
            jobs += [Job(task, setting, item, out) for item in items if item.id not in skip]
    args.out.mkdir(parents=True, exist_ok=True)
    if jobs:
        model = args.model or (await client.models.list()).data[0].id
        options = RequestOptions(model, args.max_tokens, args.temperature, args.top_p,
                                 args.seed)
        with tqdm(total=total, initial=total - len(jobs), desc="kad-eval", file=sys.stderr,
                  disable=True if args.no_progress else None) as progress:
            await run_jobs(client, jobs, options, args.concurrency, progress)
    await client.close()
    table = write_summaries(args.out, settings, tasks)
    print(table)
    summary = json.loads((args.out / "summary.json").read_text())
    failed = sum(s["errors"] for per_task in summary.values() for s in per_task.values())
    if failed:
        print(f"kad-eval: {failed} request(s) failed after retries; their lines in "
              f"{args.out}/*.jsonl carry the error (rerun with --retry-failed)", file=sys.stderr)
    print(f"kad-eval: wrote {args.out}/summary.md, summary.json and per-item JSONL",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(_main(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
