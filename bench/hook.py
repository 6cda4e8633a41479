"""``kad-bench hook``: the verification hook's cost per step next to vLLM's own verification.

One verification step of ``batch`` requests with ``gamma`` drafts each over a ``V``-token
vocabulary: vLLM's ``rejection_sample`` (the upstream function, unpatched) on random target
logits and draft probabilities, and the hook's ``mix_target_logits`` on the same inputs
(the part kad-serve adds to every step: the target becomes ``log pi``), timed alternately
in one run. The ratio hook / vLLM is the hook's overhead in units of vLLM's own verification;
the issue's CPU goal is at most 1.5. Also reported: the hook's extra memory per step, from
the allocator on CUDA and from the formula in docs/deployment.md on CPU.
"""

from __future__ import annotations

import argparse
import functools
import json

import torch

from bench.kernels import time_pair
from server.engine import verification_hook as hook

TARGET_RATIO = 1.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, nargs="+", default=[64])
    parser.add_argument("--gamma", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--rules", nargs="+", default=["kad_dual", "nudging", "kad_primal",
                                                       "confidence_bet", "aligned"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the results (a list of rows) to this path")


@functools.cache
def _upstream_rejection_sample():
    from vllm.platforms import current_platform
    from vllm.v1.sample import rejection_sampler

    # What vLLM's worker does at start: on a CPU without Triton, its C++ kernels.
    register = getattr(current_platform, "register_triton_kernel_overrides", None)
    if register is not None:
        register()

    func = rejection_sampler.rejection_sample
    return getattr(func, "__kad_original__", func)


def _sampling_metadata(batch: int, device: str):
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    empty = torch.empty(0, device=device)
    return SamplingMetadata(
        temperature=torch.ones(batch, device=device), all_greedy=False, all_random=True,
        top_p=None, top_k=None, generators={}, max_num_logprobs=None, no_penalties=True,
        prompt_token_ids=None, frequency_penalties=empty, presence_penalties=empty,
        repetition_penalties=empty, output_token_ids=[[] for _ in range(batch)],
        allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=LogitsProcessors(),
    )


def hook_extra_bytes(num_tokens: int, vocab: int) -> int:
    """The formula of docs/deployment.md: ``pi`` plus a boolean compare mask, float32."""
    return num_tokens * vocab * (4 + 1)


def measure(batch: int, gamma: int, vocab: int, rule: str, repeats: int,
            device: str) -> dict:
    from kad_kernels.rules import RULE_SPECS

    generator = torch.Generator(device=device).manual_seed(0)
    num_tokens = batch * gamma
    logits = 3 * torch.randn(num_tokens, vocab, device=device, generator=generator)
    draft_probs = torch.softmax(
        3 * torch.randn(num_tokens, vocab, device=device, generator=generator), dim=-1)
    draft_ids = torch.multinomial(draft_probs, 1, generator=generator).squeeze(-1).int()
    num_draft = [gamma] * batch
    cu = torch.tensor(num_draft, device=device).cumsum(0).int()
    bonus = torch.randint(0, vocab, (batch, 1), device=device, generator=generator).int()
    metadata = _sampling_metadata(batch, device)
    upstream = _upstream_rejection_sample()
    param = RULE_SPECS[rule].default
    rows = [hook.RowAlignment(f"r{i}", rule, param) for i in range(batch)]
    plan = hook.StepPlan.build(rows, num_draft_tokens=num_draft)
    buffer = torch.empty_like(logits)

    def vllm_verify():
        buffer.copy_(logits)
        upstream(draft_ids, num_draft, gamma, cu, draft_probs, buffer, bonus, metadata)

    def kad_hook():
        buffer.copy_(logits)
        hook.mix_target_logits(buffer, draft_probs, plan)

    def copy_only():
        buffer.copy_(logits)

    copy_s, _ = time_pair(copy_only, copy_only, repeats, device)
    vllm_s, hook_s = time_pair(vllm_verify, kad_hook, repeats, device)
    vllm_s, hook_s = max(vllm_s - copy_s, 1e-9), max(hook_s - copy_s, 1e-9)
    extra = hook_extra_bytes(num_tokens, vocab)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        kad_hook()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    return {
        "device": device, "batch": batch, "gamma": gamma, "vocab": vocab, "rule": rule,
        "vllm_verify_ms": 1e3 * vllm_s, "hook_ms": 1e3 * hook_s,
        "ratio": hook_s / vllm_s, "hook_extra_mib": extra / 2**20,
        "extra_measured": device.startswith("cuda"),
    }


def run(args: argparse.Namespace) -> int:
    rows = []
    print(f"{'device':6} {'B':>3} {'rule':15} {'vLLM ms':>9} {'hook ms':>9} {'ratio':>6} "
          f"{'extra MiB':>10}")
    for batch in args.batch:
        for rule in args.rules:
            row = measure(batch, args.gamma, args.vocab, rule, args.repeats, args.device)
            rows.append(row)
            mark = "" if row["extra_measured"] else " (formula)"
            print(f"{row['device']:6} {batch:>3} {rule:15} {row['vllm_verify_ms']:9.1f} "
                  f"{row['hook_ms']:9.1f} {row['ratio']:6.2f} {row['hook_extra_mib']:10.0f}"
                  f"{mark}")
    worst = max(row["ratio"] for row in rows)
    print(f"worst hook / vLLM verification: {worst:.2f} (goal <= {TARGET_RATIO})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return 0
