"""``kad-bench kernels``: cost of ``mix`` + ``speculative_verify`` relative to a softmax.

For each device, batch size and rule, one verification step over ``[B, gamma + 1, V]``
(mixture of random p and q* probabilities, then exact verification of random drafts) is
timed side by side with a plain ``torch.softmax`` over logits of the same shape, alternating
the two in the same run, and reported as a ratio: the softmax is the least any sampler must
do per step, so the ratio is the kernels' overhead in units of "one more softmax".

Then each speed trick the kernels keep is timed against the plain exact code it replaces,
on the same inputs, side by side (``speedup`` = plain / trick; the results are equal):

* kad_primal's row threshold: the tiered top-k search (``_PRIMAL_TOPK_TIERS``) against one
  full sort of every row, on rows as peaked as a real model's (logit scale 6), the
  benchmark's random rows (scale 3) and flat rows whose nucleus outgrows every tier (scale 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from kad_kernels import RULES, mix, speculative_verify
from kad_kernels.rules import RULE_SPECS, _primal_threshold

# The CPU goal: every rule's step within this many softmaxes.
TARGET_RATIO = 4.0
# Logit scales of the rows the kad_primal search is timed on: peaked, random, flat.
PRIMAL_SCALES = (6.0, 3.0, 1.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--gamma", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per measurement")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    parser.add_argument(
        "--device", nargs="+", default=None,
        help="devices to time (default: cpu, and cuda when available)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results (a list of rows) to this path")
    parser.add_argument("--no-tricks", action="store_true",
                        help="skip the speed tricks against their plain exact code")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_pair(
    first: Callable[[], object], second: Callable[[], object], repeats: int, device: str
) -> tuple[float, float]:
    """Median seconds of two functions called alternately after one warm-up call each, so
    that load changes on a shared machine hit both sides of the ratio alike."""

    def once(fn: Callable[[], object]) -> float:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    first(), second()
    pairs = [(once(first), once(second)) for _ in range(repeats)]
    return statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs)


def bench_batch(args: argparse.Namespace, device: str, batch: int) -> list[dict]:
    """Time every rule at one batch size; print one line each, return the rows."""
    gen = torch.Generator(device=device).manual_seed(args.seed)
    shape = (batch, args.gamma + 1, args.vocab)
    logits = torch.randn(shape, device=device, generator=gen) * 3
    p, q_star, q_base = (
        torch.softmax(torch.randn(shape, device=device, generator=gen) * 3, dim=-1)
        for _ in range(3)
    )
    drafts = torch.randint(0, args.vocab, (batch, args.gamma), device=device, generator=gen)

    def softmax() -> None:
        torch.softmax(logits, dim=-1)

    def step(rule: str) -> None:
        spec = RULE_SPECS[rule]
        param = spec.default if spec.param else None
        extra = {"q_base": q_base} if rule == "implicit_reward" else {}
        pi = mix(p, q_star, rule, param, **extra)
        speculative_verify(pi, q_star, drafts, generator=gen)

    rows = []
    for rule in args.rules:
        softmax_s, step_s = time_pair(softmax, lambda r=rule: step(r), args.repeats, device)
        row = {"device": device, "batch": batch, "gamma": args.gamma, "vocab": args.vocab,
               "rule": rule, "softmax_s": softmax_s, "mix_verify_s": step_s,
               "ratio": step_s / softmax_s}
        rows.append(row)
        print(f"{device:>6} {batch:>5} {rule:<16} {softmax_s * 1e3:>10.3f} "
              f"{step_s * 1e3:>13.3f} {row['ratio']:>6.2f}", flush=True)
    return rows


def bench_tricks(args: argparse.Namespace, device: str, batch: int) -> list[dict]:
    """Each kept speed trick against the plain exact code, on ``[B * (gamma + 1), V]`` rows."""
    gen = torch.Generator(device=device).manual_seed(args.seed)
    rows = []

    def report(trick: str, inputs: str, plain: Callable[[], object], fast: Callable[[], object],
               extra: str = "") -> None:
        plain_s, trick_s = time_pair(plain, fast, args.repeats, device)
        rows.append({"device": device, "batch": batch, "vocab": args.vocab, "trick": trick,
                     "inputs": inputs, "plain_s": plain_s, "trick_s": trick_s,
                     "speedup": plain_s / trick_s})
        print(f"{device:>6} {batch:>5} {trick:<22} {inputs:<18} {plain_s * 1e3:>10.3f} "
              f"{trick_s * 1e3:>10.3f} {plain_s / trick_s:>8.2f} {extra}", flush=True)

    n = batch * (args.gamma + 1)
    for scale in PRIMAL_SCALES:
        p = torch.softmax(torch.randn(n, args.vocab, device=device, generator=gen) * scale, -1)
        p_sum = p.sum(dim=-1, keepdim=True)
        budget = torch.full_like(p_sum, RULE_SPECS["kad_primal"].default)
        kept = (p >= _primal_threshold(p, budget, p_sum, tiers=())).sum(dim=-1).float()
        assert torch.equal(_primal_threshold(p, budget, p_sum),
                           _primal_threshold(p, budget, p_sum, tiers=()))
        report("kad_primal tiers", f"logit scale {scale:g}",
               partial(_primal_threshold, p, budget, p_sum, tiers=()),
               partial(_primal_threshold, p, budget, p_sum),
               f"(kept tokens: median {kept.median().item():g}, max {kept.max().item():g})")
    return rows


def run(args: argparse.Namespace) -> int:
    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"gamma={args.gamma} V={args.vocab}: median of {args.repeats} alternating calls; "
          f"ratio = (mix + speculative_verify) / softmax over [B, gamma+1, V]")
    print(f"{'device':>6} {'batch':>5} {'rule':<16} {'softmax ms':>10} {'mix+verify ms':>13} "
          f"{'ratio':>6}")
    rows = []
    for device in devices:
        for batch in args.batch:
            rows += bench_batch(args, device, batch)
    cpu = [row for row in rows if row["device"] == "cpu"]
    if cpu:
        worst = max(cpu, key=lambda row: row["ratio"])
        print(f"worst CPU ratio {worst['ratio']:.2f} ({worst['rule']}, batch {worst['batch']}); "
              f"target <= {TARGET_RATIO:g}")
    if not args.no_tricks:
        print(f"\nspeed tricks vs the plain exact code over [B * (gamma+1), V] rows "
              f"(median of {args.repeats} alternating calls; speedup = plain / trick)")
        print(f"{'device':>6} {'batch':>5} {'trick':<22} {'inputs':<18} {'plain ms':>10} "
              f"{'trick ms':>10} {'speedup':>8}")
        for device in devices:
            for batch in args.batch:
                rows += bench_tricks(args, device, batch)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0
