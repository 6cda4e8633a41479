"""``kad-bench serve``: speed of a running server, as its clients see it.

Streaming requests through the OpenAI API at each concurrency and rule setting: aggregate
tokens/s, per-request tokens/s, time to first token, acceptance rate (from the response's
``kad`` statistics). Warm-up first, then repeats; medians and spread go to JSON and PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

PROMPTS = ["Explain why the sky is blue.", "Solve: 48 + 24 = ?", "Tell a short story.",
           "List three prime numbers and explain."]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--settings", nargs="+", default=["kad_dual:0.4"],
                        help="rule[:param] per setting, e.g. base kad_dual:0.4 nudging:0.4")
    parser.add_argument("--gamma-label", type=int, help="the server's gamma, recorded as is")
    parser.add_argument("--requests-per-slot", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/bench"))


def _kad(setting: str) -> tuple[dict[str, Any], str, float | None]:
    from kad_kernels.rules import RULE_SPECS

    rule, _, param = setting.partition(":")
    spec = RULE_SPECS[rule]
    value = float(param) if param else spec.default
    return {"rule": rule, **({spec.param: value} if spec.param else {})}, rule, value


async def _one(client, model, prompt, kad, max_tokens, seed) -> dict[str, Any]:
    start = time.perf_counter()
    first = None
    usage = None
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, seed=seed, stream=True,
        stream_options={"include_usage": True}, extra_body={"kad": kad, "ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            usage = chunk
    total = time.perf_counter() - start
    tokens = usage.usage.completion_tokens if usage else 0
    stats = (usage.model_extra or {}).get("kad") if usage else None
    return {"tokens": tokens, "ttft": first, "seconds": total, "kad": stats}


async def _round(client, model, kad, concurrency, per_slot, max_tokens, seed0):
    limit = asyncio.Semaphore(concurrency)

    async def slot(i):
        async with limit:
            return await _one(client, model, PROMPTS[i % len(PROMPTS)], kad, max_tokens, seed0 + i)

    start = time.perf_counter()
    results = await asyncio.gather(*(slot(i) for i in range(concurrency * per_slot)))
    elapsed = time.perf_counter() - start
    drafted = sum((r["kad"] or {}).get("drafted_tokens", 0) for r in results)
    accepted = sum((r["kad"] or {}).get("accepted_tokens", 0) for r in results)
    return {
        "tokens_per_s": sum(r["tokens"] for r in results) / elapsed,
        "per_request_tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in results),
        "ttft_s": statistics.median(r["ttft"] for r in results if r["ttft"] is not None),
        "acceptance_rate": accepted / drafted if drafted else None,
    }


async def _main(args) -> list[dict[str, Any]]:
    import openai

    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0,
                                timeout=600)
    model = args.model or (await client.models.list()).data[0].id
    records = []
    for setting in args.settings:
        kad, rule, param = _kad(setting)
        for concurrency in args.concurrency:
            await _round(client, model, kad, concurrency, 1, args.max_tokens, 0)  # warm-up
            runs = [await _round(client, model, kad, concurrency, args.requests_per_slot,
                                 args.max_tokens, 1000 * (r + 1)) for r in range(args.repeats)]
            rates = [r["tokens_per_s"] for r in runs]
            acceptance = [r["acceptance_rate"] for r in runs if r["acceptance_rate"] is not None]
            record = {
                "system": f"kad:{rule}:{param}" if param is not None else f"kad:{rule}",
                "rule": rule, "param": param, "gamma": args.gamma_label,
                "concurrency": concurrency, "tokens_per_s": statistics.median(rates),
                "per_request_tokens_per_s": statistics.median(
                    r["per_request_tokens_per_s"] for r in runs),
                "ttft_s": statistics.median(r["ttft_s"] for r in runs),
                "acceptance_rate": statistics.median(acceptance) if acceptance else None,
                "repeats": rates,
            }
            records.append(record)
            print(f"{record['system']:<24} conc={concurrency:<3} {record['tokens_per_s']:8.1f} "
                  f"tok/s  ttft={record['ttft_s'] * 1e3:7.1f} ms  acceptance="
                  f"{record['acceptance_rate']}", flush=True)
    return records


def run(args: argparse.Namespace) -> int:
    from bench.plots import plot_acceptance, plot_throughput

    records = asyncio.run(_main(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps(records, indent=2))
    plot_acceptance(records, args.out / "acceptance.png")
    plot_throughput(records, args.out / "throughput.png")
    print(f"wrote {args.out}/serve.json, acceptance.png, throughput.png")
    return 0
