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


# Rows longer than this are sampled in two levels (block, then token within the block).
_BLOCK = 1024


def sample_rows(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One categorical draw per row of ``[..., V]`` (rows need not be normalised).

    Inverse CDF in float64, an order of magnitude cheaper than ``multinomial`` or per-token
    random noise on a 150k vocabulary. A cumulative sum over a whole row is a serial scan,
    so long rows go in two levels: block masses (a parallel reduction), a draw of a block
    from their CDF, then a draw inside the chosen block from its own CDF (the same uniform,
    rescaled: given the block, its position inside is uniform). The probability of token v
    is still ``p_v / sum(p)``, up to the rounding of float32 block sums (~1e-7 relative, the
    precision ``pi`` itself is computed in). Zero-probability tokens are never picked: their
    CDF step is empty and overshoots are clamped to the last positive entry.
    """
    vocab = probs.shape[-1]
    rows = probs.reshape(-1, vocab)
    uniform = torch.rand(rows.shape[0], 1, dtype=torch.float64, device=rows.device,
                         generator=generator)
    if vocab <= 4 * _BLOCK:
        index = _inverse_cdf(rows.to(torch.float64), uniform)
        return index.reshape(probs.shape[:-1])
    full = vocab // _BLOCK * _BLOCK
    # Block masses in the input precision (a float64 sum would first copy the whole row);
    # the draw inside a block is rescaled to that block's own float64 CDF, so the two
    # levels stay consistent and a block's rounding only shifts its total by ~1e-7.
    masses = rows[:, :full].reshape(rows.shape[0], -1, _BLOCK).sum(-1)
    if full < vocab:
        masses = torch.cat([masses, rows[:, full:].sum(-1, keepdim=True)], dim=-1)
    masses = masses.to(torch.float64)
    block_cdf = masses.cumsum(dim=-1)
    block = _inverse_cdf(masses, uniform, block_cdf).unsqueeze(-1)  # [N, 1]
    # Where the draw fell inside its block, as a fraction of the block's mass.
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp_min(0)), 0.0)
    fraction = ((uniform * block_cdf[:, -1:] - before) / masses.gather(-1, block)).clamp(0, 1)
    columns = block * _BLOCK + torch.arange(_BLOCK, device=rows.device)
    inside = columns < vocab
    values = rows.gather(-1, columns.clamp(max=vocab - 1)).to(torch.float64)
    values = torch.where(inside, values, 0.0)
    offset = _inverse_cdf(values, fraction)
    return (block.squeeze(-1) * _BLOCK + offset).reshape(probs.shape[:-1])


def _inverse_cdf(
    weights: torch.Tensor, fraction: torch.Tensor, cdf: torch.Tensor | None = None
) -> torch.Tensor:
    """Index per row of ``[N, K]`` nonnegative float64 ``weights`` at ``fraction`` [N, 1] of
    the row's mass: the first index whose CDF exceeds it, never a zero-weight index."""
    cdf = weights.cumsum(dim=-1) if cdf is None else cdf
    total = cdf[:, -1:].contiguous()
    index = torch.searchsorted(cdf, fraction * total, right=True)
    # A draw rounded up to the total overshoots: the last positive entry is the first
    # index where the CDF reaches the total.
    last_positive = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(index, last_positive).squeeze(-1)
