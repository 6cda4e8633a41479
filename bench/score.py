"""``kad-bench score``: prompt tokens scored per second, side by side in one run.

Systems, on the same prompts, models and engine settings:

* ``kad``: kad-serve's scoring under pi (``echo`` + ``logprobs``, ``max_tokens`` 0): one
  prefill of each model, log pi at every position (``server.engine.prompt_scoring``);
  ``--label`` names it (to put another tree's figures in the same table);
* ``vllm-target``: vLLM's own ``prompt_logprobs`` for the target alone (log p, no draft
  model): the ceiling, since scoring under pi also prefills the draft;
* ``reference``: the two-model ``transformers`` loop (``ReferenceDecoder.score_prompts``:
  one full forward of each model per batch, the mixture per position).

For each batch size (prompts sent at once) and prompt length, the figure is scored prompt
tokens (every position from 1) per second over the batch, the median of ``--repeats``
after one warm-up; the table gives each system's ratio to ``vllm-target``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.model_dirs import model_dirs
from server.alignment import AlignmentSettings
from server.config import ServeConfig
from server.engine.interface import SamplingOptions

TEXT = ("The river ran past the old mill, and the miller counted his sacks of grain twice "
        "before the market opened. Seven carts came down the hill road that morning, each "
        "carrying apples, pears or cheese, and the children ran beside them shouting the "
        "prices they had heard the day before. ")
SYSTEMS = ("kad", "vllm-target", "reference")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="models/tiny",
                        help="directory with target/ and draft/ (built if it is the tiny pair)")
    parser.add_argument("--target", help="target model dir (default MODELS/target)")
    parser.add_argument("--draft", help="draft model dir (default MODELS/draft)")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--label", default="kad", help="the name of the kad system's rows")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--rule", default="kad_dual")
    parser.add_argument("--param", type=float, default=None,
                        help="the rule's parameter (default: the README's)")
    parser.add_argument("--gamma", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-gib", type=float, default=4.0)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no torch.compile (a real pair on a small CPU starts minutes sooner)")
    parser.add_argument("--json", help="write the records here")


def _alignment(args: argparse.Namespace) -> AlignmentSettings:
    settings = AlignmentSettings.paper_default(args.rule)
    if args.param is None:
        return settings
    from kad_kernels.rules import RULE_SPECS

    return AlignmentSettings(rule=args.rule, **{RULE_SPECS[args.rule].param: args.param})


def _config(target: str, draft: str, args: argparse.Namespace) -> ServeConfig:
    return ServeConfig.model_validate({
        "models": {"target": target, "draft": draft},
        "engine": {"num_speculative_tokens": args.gamma, "dtype": args.dtype,
                   "max_model_len": max(args.lengths) + 64, "max_num_seqs": max(args.batches),
                   "cpu_kv_cache_gib": args.kv_cache_gib, "enforce_eager": args.enforce_eager},
    })


def prompts_for(tokenizer: Any, batch: int, length: int) -> list[list[int]]:
    """``batch`` different prompts of ``length`` tokens (the text, rotated per prompt)."""
    ids = tokenizer.encode(TEXT * (2 + length // 40), add_special_tokens=False)
    return [(ids[7 * i:] + ids)[:length] for i in range(batch)]


def _scored(prompts: list[list[int]]) -> int:
    return sum(len(p) - 1 for p in prompts)


def _timed(run_once, repeats: int) -> list[float]:
    run_once()  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        scored = run_once()
        rates.append(scored / (time.perf_counter() - start))
    return rates


def _bench_kad(config: ServeConfig, args, tokenizer, workloads) -> dict[tuple, list[float]]:
    from bench.background import BackgroundEngine
    from server.engine import build_engine

    alignment = _alignment(args)
    background = BackgroundEngine(build_engine(config))
    background.start(timeout=1800)
    try:
        rates = {}
        for key, prompts in workloads.items():
            sampling = SamplingOptions(max_tokens=0, logprobs=1, prompt_logprobs=True)

            def once(prompts=prompts, sampling=sampling) -> int:
                results = background.complete_many(
                    prompts, [sampling] * len(prompts), [alignment] * len(prompts),
                    concurrency=len(prompts), timeout=3600)
                assert all(len(r.prompt_logprobs) == len(p) for r, p in zip(results, prompts))
                return _scored(prompts)

            rates[key] = _timed(once, args.repeats)
            _print(args.label, key, rates[key])
        return rates
    finally:
        background.close()


async def _vllm_prompt_logprobs(llm: Any, prompts: list[list[int]], tag: str) -> int:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=1, detokenize=False)

    async def one(i: int) -> None:
        final = None
        async for out in llm.generate(TokensPrompt(prompt_token_ids=prompts[i]), params,
                                      f"score-{tag}-{i}"):
            final = out
        assert len(final.prompt_logprobs) == len(prompts[i])

    await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return _scored(prompts)


def _bench_vllm_target(config: ServeConfig, args, workloads) -> dict[tuple, list[float]]:
    """vLLM's own prompt logprobs, target alone, at the same engine settings."""
    from bench.background import target_alone

    counter = iter(range(10**9))
    rates = {}
    with target_alone(config) as (holder, llm):
        for key, prompts in workloads.items():
            rates[key] = _timed(lambda prompts=prompts: holder.run(_vllm_prompt_logprobs(
                llm, prompts, str(next(counter)))), args.repeats)
            _print("vllm-target", key, rates[key])
    return rates


def _bench_reference(target: str, draft: str, args, workloads) -> dict[tuple, list[float]]:
    from kad_kernels.reference import ReferenceDecoder

    alignment = _alignment(args)
    decoder = ReferenceDecoder.from_paths(target, draft, alignment.rule, param=alignment.param,
                                          temperature=1.0)
    rates = {}
    for key, prompts in workloads.items():
        def once(prompts=prompts) -> int:
            decoder.score_prompts(prompts, batch_size=len(prompts))
            return _scored(prompts)

        rates[key] = _timed(once, args.repeats)
        _print("reference", key, rates[key])
    return rates


def _print(system: str, key: tuple[int, int], rates: list[float]) -> None:
    batch, length = key
    print(f"{system:<20} batch={batch:<3} length={length:<5} "
          f"{statistics.median(rates):>10.1f} scored tokens/s "
          f"(runs {', '.join(f'{r:.1f}' for r in rates)})", flush=True)


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per (batch, length), one column per system, with the ratio to
    ``vllm-target`` where it ran."""
    systems = list(dict.fromkeys(r["system"] for r in records))
    keys = list(dict.fromkeys((r["batch"], r["length"]) for r in records))
    value = {(r["system"], r["batch"], r["length"]): r["tokens_per_s"] for r in records}
    lines = ["| batch | length | " + " | ".join(f"{s} tok/s" for s in systems) + " |",
             "|---|---|" + "---|" * len(systems)]
    for batch, length in keys:
        base = value.get(("vllm-target", batch, length))
        cells = []
        for system in systems:
            v = value.get((system, batch, length))
            if v is None:
                cells.append("-")
            elif base and system != "vllm-target":
                cells.append(f"{v:.0f} ({v / base:.2f}x)")
            else:
                cells.append(f"{v:.0f}")
        lines.append(f"| {batch} | {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    target, draft = model_dirs(args.models, args.target, args.draft)
    tokenizer = AutoTokenizer.from_pretrained(draft)
    workloads = {(batch, length): prompts_for(tokenizer, batch, length)
                 for batch in args.batches for length in args.lengths}
    config = _config(target, draft, args)
    results: dict[str, dict[tuple, list[float]]] = {}
    if "kad" in args.systems:
        results[args.label] = _bench_kad(config, args, tokenizer, workloads)
    if "vllm-target" in args.systems:
        results["vllm-target"] = _bench_vllm_target(config, args, workloads)
    if "reference" in args.systems:
        results["reference"] = _bench_reference(target, draft, args, workloads)
    records = [{"system": system, "batch": batch, "length": length,
                "tokens_per_s": statistics.median(rates), "runs": rates}
               for system, by_key in results.items() for (batch, length), rates in by_key.items()]
    print("\n" + table(records))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(records, indent=2))
    return 0
