"""vLLM general plugin: installs kad-serve's verification hook in every vLLM process.

vLLM loads ``vllm.general_plugins`` entry points in the API process, the engine core and
every worker, so the hook is active where sampling happens, whatever the executor. The
entry point is declared in ``pyproject.toml``; ``pip install`` registers it.
"""

from __future__ import annotations


def register() -> None:
    """Entry point for vLLM's plugin loader."""
    from server.engine import process_guard, vllm_patches

    vllm_patches.install()
    # A spawned engine process leaves kad-serve's process group (forked ones already did).
    process_guard.guard_spawned_process()
