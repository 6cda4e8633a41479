"""``kad-bench engine``: throughput and acceptance of the engine, side by side in one run.

Systems, on the same prompts and models:

* ``vllm-ar``: vLLM decoding the target ``p`` alone, no speculation;
* ``vllm-spec-base``: vLLM draft-model speculative decoding with rule ``base`` (the hook
  passes ``p`` through: vLLM's own speculative decoding, with the CPU fixes applied);
* ``kad:<rule>:<param>``: the hook with that rule;
* ``reference``: the reference decoder (transformers, batch 1, speculative), the
  research-code baseline.

Each system runs at each concurrency (requests in flight) and gamma; the result is
tokens/s over the whole run (median of repeats), the acceptance rate accepted/drafted and
the mean deferred mass (alpha per verified position; 0 for ``base``), both pooled over the
repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.model_dirs import model_dirs
from server.alignment import AlignmentSettings
from server.config import ServeConfig
from server.engine.interface import RequestStats, SamplingOptions

PROMPTS = [
    "Question: Natalia sold clips to 48 of her friends in April. How many clips?",
    "Explain step by step why the sky is blue.",
    "Write a short story about a fox and a dog.",
    "What is 12 times 7? Answer:",
]
DEFAULT_SYSTEMS = ["vllm-ar", "vllm-spec-base", "kad:kad_dual:0.4", "kad:kad_primal:0.9",
                   "kad:nudging:0.4", "kad:confidence_bet:0.2", "reference"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="models/tiny",
                        help="directory with target/ and draft/ (built if it is the tiny pair)")
    parser.add_argument("--target", help="target model dir (default MODELS/target)")
    parser.add_argument("--draft", help="draft model dir (default MODELS/draft)")
    parser.add_argument("--systems", nargs="+", default=DEFAULT_SYSTEMS)
    parser.add_argument("--gamma", type=int, nargs="+", default=[3, 5, 7])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests-per-slot", type=int, default=2,
                        help="requests per concurrent slot in one run")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no torch.compile (a real pair on a small CPU starts minutes sooner)")
    parser.add_argument("--device", default="cpu", help="informational: vLLM picks its device")
    parser.add_argument("--json", help="write the records here")


def _config(target: str, draft: str, gamma: int, args: argparse.Namespace) -> ServeConfig:
    return ServeConfig.model_validate({
        "models": {"target": target, "draft": draft},
        "engine": {"num_speculative_tokens": gamma, "dtype": args.dtype, "max_model_len": 1024,
                   "cpu_kv_cache_gib": 2, "max_num_seqs": 64,
                   "enforce_eager": args.enforce_eager},
    })


def _parse_system(system: str) -> tuple[str, AlignmentSettings | None]:
    if system == "vllm-spec-base":
        return "spec", AlignmentSettings(rule="base")
    if system.startswith("kad:"):
        _, rule, *param = system.split(":")
        settings = AlignmentSettings.paper_default(rule)
        if param:
            from kad_kernels.rules import RULE_SPECS

            settings = AlignmentSettings(rule=rule, **{RULE_SPECS[rule].param: float(param[0])})
        return "spec", settings
    return system, None


def _workload(tokenizer, concurrency: int, per_slot: int) -> list[list[int]]:
    count = concurrency * per_slot
    return [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(count)]


def _pooled(stats: Iterable[RequestStats | None]) -> RequestStats:
    """The sum of the given statistics (None: a request or run without any)."""
    totals = RequestStats()
    for item in stats:
        if item is not None:
            totals.add(item)
    return totals


def _record(system: str, alignment: AlignmentSettings | None, gamma: int | None,
            concurrency: int, runs: list[tuple[float, RequestStats | None]]) -> dict[str, Any]:
    """One table row: median tokens/s of the repeats; acceptance and mean deferred mass
    over all repeats' verified positions together (None where nothing was drafted)."""
    rates = [r for r, _ in runs]
    totals = _pooled(stats for _, stats in runs)
    drafted = totals.drafted > 0
    return {
        "system": system,
        "rule": None if alignment is None else alignment.rule,
        "param": None if alignment is None else alignment.param,
        "gamma": gamma, "concurrency": concurrency,
        "tokens_per_s": statistics.median(rates),
        "acceptance_rate": totals.acceptance_rate if drafted else None,
        "mean_deferred_mass": totals.mean_alpha if drafted else None,
        "repeats": rates,
    }


def _run_spec(background, prompts, alignment, max_tokens, concurrency, seed0):
    samplings = [SamplingOptions(max_tokens=max_tokens, seed=seed0 + i, ignore_eos=True)
                 for i in range(len(prompts))]
    start = time.perf_counter()
    results = background.complete_many(prompts, samplings, [alignment] * len(prompts),
                                       concurrency=concurrency)
    elapsed = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in results)
    return tokens / elapsed, _pooled(r.stats for r in results)


async def _plain_vllm_run(llm, prompts, max_tokens, concurrency, seed0) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    limit = asyncio.Semaphore(concurrency)
    counts = []

    async def one(i: int) -> None:
        async with limit:
            params = SamplingParams(max_tokens=max_tokens, seed=seed0 + i, ignore_eos=True)
            final = None
            async for out in llm.generate(TokensPrompt(prompt_token_ids=prompts[i]), params,
                                          f"ar-{seed0}-{i}"):
                final = out
            counts.append(len(final.outputs[0].token_ids))

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return sum(counts) / (time.perf_counter() - start)


def _bench_plain(config: ServeConfig, args, tokenizer) -> list[dict[str, Any]]:
    from bench.background import target_alone

    records = []
    with target_alone(config) as (holder, llm):
        for concurrency in args.concurrency:
            prompts = _workload(tokenizer, concurrency, args.requests_per_slot)
            holder.run(_plain_vllm_run(llm, prompts, args.max_tokens, concurrency, 0))  # warm-up
            runs = [(holder.run(_plain_vllm_run(llm, prompts, args.max_tokens, concurrency,
                                                100 * (r + 1))), None)
                    for r in range(args.repeats)]
            records.append(_record("vllm-ar", None, None, concurrency, runs))
            _print(records[-1])
    return records


def _bench_reference(target: str, draft: str, args, tokenizer) -> list[dict[str, Any]]:
    import torch

    from kad_kernels.reference import ReferenceDecoder

    decoder = ReferenceDecoder.from_paths(target, draft, "kad_dual", param=0.4)
    records = []
    gamma = args.gamma[len(args.gamma) // 2]
    prompts = _workload(tokenizer, 1, max(2, args.requests_per_slot))
    runs = []
    for r in range(args.repeats):
        gen = torch.Generator().manual_seed(r)
        start = time.perf_counter()
        totals = RequestStats()
        for prompt in prompts:
            result = decoder.generate_speculative(prompt, args.max_tokens, gamma, gen)
            totals.add(RequestStats(drafted=result.drafted, accepted=result.accepted,
                                    emitted=result.emitted, positions=len(result.alphas),
                                    alpha_sum=sum(result.alphas)))
        runs.append((totals.emitted / (time.perf_counter() - start), totals))
    # Batch 1 by construction: its throughput is the same at every concurrency.
    for concurrency in args.concurrency:
        records.append(_record("reference", AlignmentSettings(rule="kad_dual", lam=0.4),
                               gamma, concurrency, runs))
        _print(records[-1])
    return records


def _print(record: dict[str, Any]) -> None:
    acceptance, deferred = record["acceptance_rate"], record["mean_deferred_mass"]
    spread = max(record["repeats"]) - min(record["repeats"])
    print(f"{record['system']:<24} gamma={record['gamma']!s:<4} conc={record['concurrency']:<3} "
          f"{record['tokens_per_s']:>9.1f} tok/s (±{spread / 2:.1f})  acceptance="
          f"{'-' if acceptance is None else f'{acceptance:.3f}'}  deferred mass="
          f"{'-' if deferred is None else f'{deferred:.3f}'}", flush=True)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from bench.background import BackgroundEngine
    from server.engine import build_engine

    target, draft = model_dirs(args.models, args.target, args.draft)
    tokenizer = AutoTokenizer.from_pretrained(draft)
    parsed = [(system, *_parse_system(system)) for system in args.systems]
    records: list[dict[str, Any]] = []
    if any(kind == "vllm-ar" for _, kind, _ in parsed):
        records += _bench_plain(_config(target, draft, args.gamma[0], args), args, tokenizer)
    spec = [(system, alignment) for system, kind, alignment in parsed if kind == "spec"]
    for gamma in args.gamma if spec else []:
        background = BackgroundEngine(build_engine(_config(target, draft, gamma, args)))
        background.start(timeout=900)
        try:
            for concurrency in args.concurrency:
                prompts = _workload(tokenizer, concurrency, args.requests_per_slot)
                for system, alignment in spec:
                    _run_spec(background, prompts, alignment, args.max_tokens, concurrency, 0)
                    runs = [_run_spec(background, prompts, alignment, args.max_tokens,
                                      concurrency, 100 * (r + 1)) for r in range(args.repeats)]
                    records.append(_record(system, alignment, gamma, concurrency, runs))
                    _print(records[-1])
        finally:
            background.close()
    if any(kind == "reference" for _, kind, _ in parsed):
        records += _bench_reference(target, draft, args, tokenizer)
    _print_ratios(records)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(records, indent=2))
    return 0


def _print_ratios(records: list[dict[str, Any]]) -> None:
    """The issue's targets: hook vs vLLM speculative (same gamma) and vs the reference."""
    by_key = {(r["system"], r["gamma"], r["concurrency"]): r for r in records}
    print("\nratios (tokens/s):")
    for r in records:
        if not r["system"].startswith("kad:"):
            continue
        base = by_key.get(("vllm-spec-base", r["gamma"], r["concurrency"]))
        ar = next((x for x in records if x["system"] == "vllm-ar"
                   and x["concurrency"] == r["concurrency"]), None)
        ref = next((x for x in records if x["system"] == "reference"
                    and x["concurrency"] == r["concurrency"]), None)
        parts = [f"{r['system']:<24} gamma={r['gamma']} conc={r['concurrency']:<3}"]
        if base:
            parts.append(f"vs spec-base {r['tokens_per_s'] / base['tokens_per_s']:.2f}x")
        if ar:
            parts.append(f"vs vllm-ar {r['tokens_per_s'] / ar['tokens_per_s']:.2f}x")
        if ref:
            parts.append(f"vs reference {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x")
        print("  ".join(parts))
