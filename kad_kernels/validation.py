"""Input checks shared by every kernel: fail early with a ValueError that names the problem."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_rule(rule: str, known: Sequence[str]) -> str:
    if not isinstance(rule, str) or rule not in known:
        raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(known)}")
    return rule


def check_param(
    param: float | torch.Tensor,
    name: str,
    low: float,
    high: float,
    lead_shape: torch.Size,
    device: torch.device,
) -> torch.Tensor:
    """Return ``param`` as float32 shaped ``[..., 1]`` broadcastable against ``[..., V]``."""
    if isinstance(param, bool) or not isinstance(param, (int, float, torch.Tensor)):
        raise ValueError(f"parameter {name!r} must be a number or a tensor, got {param!r}")
    value = torch.as_tensor(param, dtype=torch.float32, device=device)
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"parameter {name!r} must be finite, got {param!r}")
    if bool((value < low).any()) or bool((value > high).any()):
        raise ValueError(f"parameter {name!r} must lie in [{low}, {high}], got {param!r}")
    try:
        if torch.broadcast_shapes(value.shape, lead_shape) != lead_shape:
            raise RuntimeError("would enlarge the batch")
    except RuntimeError as exc:
        raise ValueError(
            f"parameter {name!r} of shape {tuple(value.shape)} does not broadcast to the "
            f"leading dimensions {tuple(lead_shape)}"
        ) from exc
    if value.dim() > len(lead_shape):
        raise ValueError(
            f"parameter {name!r} has more dimensions than the leading dimensions "
            f"{tuple(lead_shape)}"
        )
    return value.unsqueeze(-1)


def as_probs(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a probability tensor; return it as float32 with its row sums ``[..., 1]``.

    Rows need not sum exactly to 1 (float16 inputs rarely do): every kernel normalises by
    the row sum, so only negative, non-finite or all-zero rows are errors.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(x.shape)}")
    x = x.float()
    # One reduction catches negatives and NaN (min propagates NaN; NaN >= 0 is False).
    if x.numel() and not bool(x.amin() >= 0):
        if bool(torch.isnan(x).any()):
            raise ValueError(f"{name} contains NaN")
        raise ValueError(f"{name} contains negative probabilities")
    row_sum = x.sum(dim=-1, keepdim=True)
    if not bool(torch.isfinite(row_sum).all()):
        raise ValueError(f"{name} contains infinite values")
    if bool((row_sum <= 0).any()):
        raise ValueError(f"{name} has a row with zero total probability")
    return x, row_sum


def check_same_shape(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"shape mismatch: {a_name} has shape {tuple(a.shape)} but {b_name} has "
            f"shape {tuple(b.shape)}"
        )
