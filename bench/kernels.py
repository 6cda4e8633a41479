"""``kad-bench kernels``: cost of ``mix`` + ``speculative_verify`` relative to a softmax.

For each batch size and rule, one verification step over ``[B, gamma + 1, V]`` is timed
side by side with a plain ``torch.softmax`` over a tensor of the same shape, in the same
run, and reported as a ratio (the softmax is the least any sampler must do per step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from kad_kernels import RULES, mix, speculative_verify
from kad_kernels.rules import RULE_SPECS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--gamma", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rules", nargs="+", default=list(RULES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the results here")


def _timer(device: str) -> Callable[[Callable[[], object], int], float]:
    def median_seconds(fn: Callable[[], object], repeats: int) -> float:
        fn()  # warm-up
        samples = []
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    return median_seconds


def run(args: argparse.Namespace) -> int:
    device = args.device
    timed = _timer(device)
    gen = torch.Generator(device=device).manual_seed(0)
    results = []
    print(f"device={device} gamma={args.gamma} V={args.vocab} (median of {args.repeats})")
    print(f"{'batch':>5} {'rule':<16} {'softmax ms':>10} {'mix+verify ms':>13} {'ratio':>6}")
    for batch in args.batch:
        shape = (batch, args.gamma + 1, args.vocab)
        logits = torch.randn(shape, device=device, generator=gen) * 3
        p = torch.softmax(torch.randn(shape, device=device, generator=gen) * 3, dim=-1)
        q_star = torch.softmax(torch.randn(shape, device=device, generator=gen) * 3, dim=-1)
        q_base = torch.softmax(torch.randn(shape, device=device, generator=gen) * 3, dim=-1)
        drafts = torch.randint(0, args.vocab, (batch, args.gamma), device=device, generator=gen)
        softmax_s = timed(lambda: torch.softmax(logits, dim=-1), args.repeats)
        for rule in args.rules:
            spec = RULE_SPECS[rule]
            param = spec.default if spec.param else None
            extra = {"q_base": q_base} if rule == "implicit_reward" else {}

            def step() -> None:
                pi = mix(p, q_star, rule, param, **extra)
                speculative_verify(pi, q_star[:, : args.gamma], drafts, generator=gen)

            seconds = timed(step, args.repeats)
            ratio = seconds / softmax_s
            results.append({"device": device, "batch": batch, "gamma": args.gamma,
                            "vocab": args.vocab, "rule": rule, "softmax_s": softmax_s,
                            "mix_verify_s": seconds, "ratio": ratio})
            print(f"{batch:>5} {rule:<16} {softmax_s * 1e3:>10.2f} {seconds * 1e3:>13.2f} "
                  f"{ratio:>6.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0
