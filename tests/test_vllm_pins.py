"""The vLLM internals kad-serve patches still have the signatures it was written against."""

from __future__ import annotations

import pytest

from server.engine import vllm_patches


def test_installed_vllm_matches_every_pinned_signature():
    vllm_patches.check_pinned_internals()  # raises PinnedInternalsError naming the function


def test_every_patched_function_is_pinned():
    patched = {
        "vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample",
        "vllm.v1.worker.gpu_model_runner.GPUModelRunner._copy_draft_token_ids_to_cpu",
        "vllm.v1.worker.gpu_model_runner.GPUModelRunner._get_spec_decode_draft_probs",
        "vllm.v1.sample.rejection_sampler.rejection_sample",
        "vllm.v1.sample.rejection_sampler.expand_batch_to_tokens",
        "vllm.v1.spec_decode.llm_base_proposer.compute_probs_and_sample_next_token",
    }
    assert set(vllm_patches.PINNED_SIGNATURES) == patched


def test_a_changed_signature_fails_loudly_with_the_function_name(monkeypatch):
    name = "vllm.v1.sample.rejection_sampler.rejection_sample"
    changed = dict(vllm_patches.PINNED_SIGNATURES)
    changed[name] = ("draft_token_ids", "something_new")
    monkeypatch.setattr(vllm_patches, "PINNED_SIGNATURES", changed)
    with pytest.raises(vllm_patches.PinnedInternalsError, match="rejection_sample has parameters"):
        vllm_patches.check_pinned_internals()


def test_a_different_vllm_version_fails_loudly(monkeypatch):
    monkeypatch.setattr(vllm_patches, "PINNED_VLLM_VERSION", "0.0.1")
    with pytest.raises(vllm_patches.PinnedInternalsError, match="pinned to 0.0.1"):
        vllm_patches.check_pinned_internals()
