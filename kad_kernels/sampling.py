"""Turning logits into the distributions the rules see, and drawing from them.

DESIGN.md: every distribution is taken *after* the request's temperature, top-k and top-p.
Temperature 0 means greedy: distributions are taken at temperature 1 and the argmax of
``pi`` is emitted, so the rules still see a non-degenerate ``p``.
"""

from __future__ import annotations

import torch


def probs_from_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Softmax of ``logits / temperature`` restricted to top-k, then to the top-p nucleus.

    Top-p keeps the smallest set of most likely tokens whose mass reaches ``top_p`` (ties
    at the boundary kept), as vLLM and Hugging Face do.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    if top_k is not None and 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p is not None and top_p < 1.0:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        sorted_p, _ = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        # The smallest kept probability: last token whose preceding mass is below top_p.
        n_keep = (mass_before < top_p).sum(dim=-1, keepdim=True).clamp_min(1)
        cutoff = sorted_p.gather(-1, n_keep - 1)
        probs = probs.masked_fill(probs < cutoff, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_rows(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One categorical draw per row of ``[N, V]`` (rows need not be normalised).

    Inverse CDF: one float64 cumulative sum and a binary search per row, an order of
    magnitude cheaper than ``multinomial`` or per-token random noise on a 150k vocabulary.
    Zero-probability tokens are never picked (their CDF step is empty).
    """
    cdf = probs.to(torch.float64).cumsum(dim=-1)
    uniform = torch.rand(cdf.shape[:-1] + (1,), dtype=torch.float64, device=cdf.device,
                         generator=generator)
    index = torch.searchsorted(cdf, uniform * cdf[..., -1:], right=True)
    return index.squeeze(-1).clamp_(max=probs.shape[-1] - 1)
