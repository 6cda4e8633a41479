"""Where a benchmark's two models are: ``--target``/``--draft``, or ``--models`` holding
``target/`` and ``draft/`` (the tiny pair, built on demand, deterministic)."""

from __future__ import annotations

from pathlib import Path


def model_dirs(models: str, target: str | None, draft: str | None) -> tuple[str, str]:
    """``(target dir, draft dir)``; a ``--models`` directory named ``tiny*`` is built."""
    root = Path(models)
    if target is None and draft is None and root.name.startswith("tiny"):
        from kad_kernels.tiny_models import build_tiny_pair

        build_tiny_pair(root)
    return target or str(root / "target"), draft or str(root / "draft")
