"""Shared fixtures: the tiny model pair, the reference decoder, a running vLLM engine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kad_kernels.tiny_models import TinyPair, build_tiny_pair

REPO = Path(__file__).resolve().parent.parent
# Built once per checkout (atomic, so parallel sessions are safe); ignored by git.
TINY_ROOT = Path(os.environ.get("KAD_TEST_MODELS", REPO / "models" / "tiny-test"))


@pytest.fixture(scope="session")
def tiny_pair() -> TinyPair:
    return build_tiny_pair(TINY_ROOT)


@pytest.fixture(scope="session")
def reference_factory(tiny_pair):
    """``make(rule, param, **sampling)`` -> a ReferenceDecoder on the tiny pair."""
    from transformers import AutoModelForCausalLM

    from kad_kernels.reference import ReferenceDecoder

    target = AutoModelForCausalLM.from_pretrained(tiny_pair.target)
    draft = AutoModelForCausalLM.from_pretrained(tiny_pair.draft)

    def make(rule: str, param: float | None = None, **sampling) -> ReferenceDecoder:
        return ReferenceDecoder(
            target, draft, rule, param, eos_token_id=target.config.eos_token_id, **sampling
        )

    return make


@pytest.fixture(scope="module")
def tokenizer(tiny_pair):
    """The tiny pair's tokenizer (the aligned model's), as the fake-engine servers use."""
    from fake_engine import load_tokenizer

    return load_tokenizer(str(tiny_pair.draft))


@pytest.fixture(scope="module")
def served(tokenizer):
    """``(url, fake engine)``: the real app on the fake engine, ``max_model_len`` 256."""
    from fake_engine import serve_fake
    from waiting import wait_ready

    thread, engine = serve_fake(tokenizer, max_model_len=256)
    wait_ready(thread.url)
    yield thread.url, engine
    thread.stop()


@pytest.fixture(scope="session")
def production_engine(tiny_pair):
    """The engine at the shipped gamma 5 (multiprocess engine core), shared by tests."""
    from bench.background import BackgroundEngine
    from server.engine import build_engine

    engine = BackgroundEngine(build_engine(tiny_serve_config(
        tiny_pair, num_speculative_tokens=5)))
    engine.start(timeout=600)
    yield engine
    engine.close()


def tiny_serve_config(pair: TinyPair, **engine):
    """A ServeConfig for the tiny pair (float32, small KV cache) with engine overrides.
    Eager, as the shipped CPU configs: vLLM's CPU torch.compile pass recompiles at every
    start (about half an engine's start-up here) and does not touch the sampler the hook
    patches."""
    from server.config import ServeConfig

    settings = {"dtype": "float32", "max_model_len": 512, "cpu_kv_cache_gib": 1,
                "max_num_seqs": 256, "num_speculative_tokens": 1, "enforce_eager": True}
    settings.update(engine)
    return ServeConfig.model_validate({
        "models": {"target": str(pair.target), "draft": str(pair.draft)},
        "engine": settings,
    })


@pytest.fixture(scope="session")
def tiny_engine(tiny_pair):
    """The vLLM engine with the hook (multiprocess engine core, gamma 1), shared by tests."""
    from bench.background import BackgroundEngine
    from server.engine import build_engine

    engine = BackgroundEngine(build_engine(tiny_serve_config(tiny_pair)))
    engine.start(timeout=600)
    yield engine
    engine.close()
