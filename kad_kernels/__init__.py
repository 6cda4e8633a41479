"""kad_kernels: KAD deferral rules, the mixture and exact speculative verification.

Pure tensor code (no vLLM import), batched over requests x positions x vocabulary, the same
on CPU and CUDA. The vLLM verification hook and the reference decoder both call it.
"""

from kad_kernels.mixture import (
    MixtureStats,
    acceptance_probability,
    deferral,
    mix,
    mix_trusted,
    mix_with_alpha,
    mixture_stats,
)
from kad_kernels.rules import RULE_SPECS, RULES, TWO_MODEL_RULES, RuleSpec
from kad_kernels.sampling import probs_from_logits, sample_rows
from kad_kernels.speculative import speculative_verify

__all__ = [
    "RULES",
    "RULE_SPECS",
    "TWO_MODEL_RULES",
    "MixtureStats",
    "RuleSpec",
    "acceptance_probability",
    "deferral",
    "mix",
    "mix_trusted",
    "mix_with_alpha",
    "mixture_stats",
    "probs_from_logits",
    "sample_rows",
    "speculative_verify",
]
