"""vLLM's memory profile must reserve at least what the hook uses in a real step.

A real step here is ``_sample`` (the wrapped one) on a fake runner whose upstream sampler
allocates what vLLM's does (a processed copy of the target logits, its outputs and
logprobs tensors), with mixed rules including ``kad_primal``, a greedy row, and logprobs
with the top 20 on every request. Both peaks are measured by counting the bytes of live
tensor storages created inside the measured call.
"""

from __future__ import annotations

import weakref
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from server.engine import vllm_patches
from server.engine.hook_settings import HookSettings

NUM_SEQS, GAMMA, VOCAB, TOP = 8, 5, 4096, 20


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages allocated under the mode and still referenced."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self._seen:
                continue
            self._seen.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(tensor, self._free, key, size)
        return out


def _rows() -> list[dict]:
    rules = ("kad_dual", "kad_primal")
    return [{"id": f"r{i}", "rule": rules[i % 2], "param": 0.4 if i % 2 == 0 else 0.9,
             "greedy": i == 0, "logprobs": TOP} for i in range(NUM_SEQS)]


def _fake_runner() -> SimpleNamespace:
    req_ids = [row["id"] for row in _rows()]
    metadata = SimpleNamespace(
        temperature=torch.ones(NUM_SEQS), top_k=None, top_p=None, no_penalties=True,
        generators={}, max_num_logprobs=TOP, all_greedy=False, all_random=True)
    return SimpleNamespace(
        vllm_config=SimpleNamespace(additional_config=HookSettings()),
        speculative_config=SimpleNamespace(num_speculative_tokens=GAMMA),
        requests={row["id"]: SimpleNamespace(sampling_params=SimpleNamespace(
            extra_args={"kad": row})) for row in _rows()},
        input_batch=SimpleNamespace(
            req_ids=req_ids, num_reqs=NUM_SEQS, spec_token_ids=[[5] * GAMMA] * NUM_SEQS,
            num_prompt_tokens=np.full(NUM_SEQS, 10), sampling_metadata=metadata,
            generators={}),
        optimistic_seq_lens_cpu=torch.full((NUM_SEQS,), 40),
        discard_request_mask=SimpleNamespace(np=np.zeros(NUM_SEQS, dtype=bool)),
    )


def _real_step() -> None:
    """One verification step of ``NUM_SEQS`` requests through the wrapped ``_sample``."""
    runner = _fake_runner()
    num_tokens = NUM_SEQS * GAMMA
    width = GAMMA + 1
    # The proposal that made this step's drafts (vLLM's _draft_probs) and its record.
    proposal = torch.softmax(torch.randn(NUM_SEQS, GAMMA, VOCAB), dim=-1)
    runner.input_batch.sampling_metadata.generators = {}
    vllm_patches._wrap_copy_draft_token_ids_to_cpu(lambda *a: None)(
        SimpleNamespace(**vars(runner), _draft_probs=proposal), None)
    logits = torch.randn(num_tokens + NUM_SEQS, VOCAB)  # vLLM's target logits

    def upstream_sample(self, logits, metadata):
        draft_probs = vllm_patches._per_request_draft_probs(lambda *a: None)(self, metadata)
        target = logits[:num_tokens].clone()  # vLLM's processed target (temperature etc.)
        vllm_patches._wrap_rejection_sample(lambda *a, **k: None)(
            metadata.draft_token_ids, metadata.num_draft_tokens, GAMMA, None, draft_probs,
            target, None, None)
        sampled = torch.full((NUM_SEQS, width), -1, dtype=torch.int32)
        sampled[:, :3] = 7
        logprobs = SimpleNamespace(
            logprob_token_ids=torch.zeros(NUM_SEQS * width, TOP + 1, dtype=torch.int32),
            logprobs=torch.zeros(NUM_SEQS * width, TOP + 1),
            selected_token_ranks=torch.zeros(NUM_SEQS * width, dtype=torch.int32))
        return SimpleNamespace(sampled_token_ids=sampled, logprobs_tensors=logprobs)

    metadata = SimpleNamespace(num_draft_tokens=[GAMMA] * NUM_SEQS,
                               draft_token_ids=torch.full((num_tokens,), 5))
    output = vllm_patches._wrap_sample(upstream_sample)(runner, logits, metadata)
    assert output.sampled_token_ids[:, 3:].eq(-1).all()  # the step ran to the end


def _peak(step) -> int:
    with LiveBytes() as meter:
        step()
    return meter.peak


def test_the_profile_run_reserves_at_least_a_real_steps_peak():
    real = _peak(_real_step)
    profile = _peak(lambda: vllm_patches.profile_hook_memory(
        NUM_SEQS, GAMMA, VOCAB, torch.device("cpu")))
    one = NUM_SEQS * GAMMA * VOCAB * 4  # one [n, V] float32 tensor
    assert real > 4 * one  # the measurement sees the step's [n, V] temporaries
    assert profile >= real, (profile / one, real / one)


def test_the_old_profile_would_undercount():
    """The profile before it covered logprobs, kad_primal and the stored proposal: only
    the mixture of one rule. The comparison above has teeth."""
    from server.engine import verification_hook as hook

    def old_profile():
        num_tokens = NUM_SEQS * GAMMA
        target = torch.randn(num_tokens, VOCAB)
        q_star = torch.softmax(torch.randn(num_tokens, VOCAB), dim=-1)
        rows = [hook.RowAlignment(f"p{i}", "kad_dual", 0.4, greedy=i == 0)
                for i in range(NUM_SEQS)]
        state = hook.StepState(rows=rows, num_draft_tokens=[GAMMA] * NUM_SEQS)
        hook.mix_target_logits(target, q_star, state.num_draft_tokens, state)

    assert _peak(old_profile) < _peak(_real_step)
