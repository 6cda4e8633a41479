"""Engines behind the HTTP layer: the interface, and the vLLM one built from a config.

``build_engine`` imports vLLM lazily so that the HTTP layer, the config tools and their
tests import without starting (or even importing) vLLM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.engine.interface import Engine, GenerationChunk, RequestStats, SamplingOptions

if TYPE_CHECKING:
    from server.config import ServeConfig


def build_engine(config: ServeConfig) -> Engine:
    """The vLLM engine for ``config``; cheap to construct, call ``await engine.start()``."""
    from server.engine.vllm_engine import VllmEngine

    return VllmEngine(config)


__all__ = ["Engine", "GenerationChunk", "RequestStats", "SamplingOptions", "build_engine"]
