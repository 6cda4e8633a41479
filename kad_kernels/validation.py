"""Input checks shared by every kernel: fail early with a ValueError that names the problem."""

from __future__ import annotations

import math
import weakref
from collections import deque
from collections.abc import Sequence

import torch

# Float32 tensors validated lately, with their row sums: a caller passing the same unchanged
# tensor to several kernels (q* to ``mix`` and then ``speculative_verify``) pays the two
# vocabulary passes of validation once. A weak reference (identity, not a reused address)
# and the version counter (bumped by every in-place write, through views too) make a hit safe.
_RECENT: deque[tuple[weakref.ref, int, torch.Tensor]] = deque(maxlen=4)


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
    if not isinstance(param, torch.Tensor):  # a plain number: checked without tensor ops
        if not math.isfinite(param):
            raise ValueError(f"parameter {name!r} must be finite, got {param!r}")
        if not low <= param <= high:
            raise ValueError(f"parameter {name!r} must lie in [{low}, {high}], got {param!r}")
        return torch.tensor([float(param)], device=device)
    value = param.to(device=device, dtype=torch.float32)
    if value.numel():
        lowest, highest = torch.stack([value.amin(), value.amax()]).tolist()  # one sync
        if not (math.isfinite(lowest) and math.isfinite(highest)):
            raise ValueError(f"parameter {name!r} must be finite, got {param!r}")
        if lowest < low or highest > high:
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


def _cacheable(x: torch.Tensor) -> bool:
    """Float32 tensors with a version counter (inference-mode tensors, what vLLM's sampler
    hands the hook, have none) and no autograd history."""
    return x.dtype == torch.float32 and not x.is_inference() and not x.requires_grad


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
    cacheable = _cacheable(x)
    if cacheable:
        for ref, version, cached_sum in tuple(_RECENT):
            if ref() is x and x._version == version:
                return x, cached_sum
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
    if cacheable:
        remember_probs(x, row_sum)
    return x, row_sum


def remember_probs(x: torch.Tensor, row_sum: torch.Tensor) -> None:
    """Record a tensor a kernel built as a distribution, so ``as_probs`` need not check it."""
    if _cacheable(x):
        _RECENT.append((weakref.ref(x), x._version, row_sum))


def check_same_shape(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"shape mismatch: {a_name} has shape {tuple(a.shape)} but {b_name} has "
            f"shape {tuple(b.shape)}"
        )
