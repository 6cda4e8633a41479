"""Input checks shared by every kernel: fail early with a ValueError that names the problem."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def check_rule(rule: str, known: Sequence[str]) -> str:
    if not isinstance(rule, str) or rule not in known:
        raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(known)}")
    return rule


def check_number(value: float, name: str, low: float, high: float) -> None:
    """A parameter value (or the extremes of a parameter tensor) lies in ``[low, high]``."""
    if not math.isfinite(value):
        raise ValueError(f"parameter {name!r} must be finite (it must lie in [{low}, {high}]), "
                         f"got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"parameter {name!r} must lie in [{low}, {high}], got {value!r}")


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
    if not isinstance(param, torch.Tensor):
        check_number(param, name, low, high)
        return torch.tensor([float(param)], device=device)
    value = param.to(device=device, dtype=torch.float32)
    if value.numel():
        for extreme in (value.amin().item(), value.amax().item()):
            check_number(extreme, name, low, high)
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
    row_sum = x.sum(dim=-1, keepdim=True)
    if x.numel() == 0:
        return x, row_sum
    # One host sync for every check: the smallest entry (NaN propagates through amin and
    # fails ">= 0") and the smallest/largest row sums (inf shows up in its row's sum).
    lowest, low_sum, high_sum = torch.stack(
        [x.amin(), row_sum.amin(), row_sum.amax()]
    ).tolist()
    if not lowest >= 0:
        if bool(torch.isnan(x).any()):
            raise ValueError(f"{name} contains NaN")
        raise ValueError(f"{name} contains negative probabilities")
    if not high_sum < math.inf:
        raise ValueError(f"{name} contains infinite values")
    if not low_sum > 0:
        raise ValueError(f"{name} has a row with zero total probability")
    return x, row_sum


def check_same_shape(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"shape mismatch: {a_name} has shape {tuple(a.shape)} but {b_name} has "
            f"shape {tuple(b.shape)}"
        )
