"""What kad-serve tells the verification hook, carried in vLLM's own engine config.

An engine that kad-serve starts passes a ``HookSettings`` as ``VllmConfig.additional_config``;
vLLM ships that config to the engine core and every worker, whatever the executor (mp,
Ray, other hosts), unlike environment variables. The hook is active only in an engine
whose config carries one, so ``vllm serve`` run from the same environment is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.engine.hook_context import HookContext

# Changes when the hook's behaviour changes; vLLM folds it into its compile-cache key.
HOOK_VERSION = "kad-serve-hook-2"


@dataclass(frozen=True)
class HookSettings:
    """The marker that turns the hook on, and where workers send per-request statistics."""

    stats_endpoint: str | None = None
    # This process's hook state for the engine (never pickled: each process gets its own).
    context: HookContext = field(default_factory=HookContext, compare=False, repr=False)

    def compute_hash(self) -> str:
        """vLLM hashes ``additional_config`` into its torch.compile cache key. The endpoint
        changes every start and does not affect compiled graphs, so it is left out: a
        restart reuses the compile cache."""
        return HOOK_VERSION


def context_of(vllm_config: Any) -> HookContext | None:
    """The hook context of an engine kad-serve started (None: the hook is inert)."""
    settings = settings_of(vllm_config)
    return None if settings is None else settings.context


def settings_of(vllm_config: Any) -> HookSettings | None:
    """The hook settings of an engine, or None for an engine kad-serve did not start."""
    extra = getattr(vllm_config, "additional_config", None)
    return extra if isinstance(extra, HookSettings) else None
