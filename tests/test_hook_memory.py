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


def fake_runner(rows: list[dict]) -> SimpleNamespace:
    """Just enough of vLLM's ``GPUModelRunner`` for a verification step of ``rows`` (the
    ``extra_args['kad']`` of each request), each with ``GAMMA`` drafts."""
    num_seqs = len(rows)
    req_ids = [row["id"] for row in rows]
    metadata = SimpleNamespace(
        temperature=torch.ones(num_seqs), top_k=None, top_p=None, no_penalties=True,
        generators={}, max_num_logprobs=TOP, all_greedy=False, all_random=True,
        bad_words_token_ids={}, allowed_token_ids_mask=None,  # nothing forbids a token
        logitsprocs=SimpleNamespace(non_argmax_invariant=[]))
    return SimpleNamespace(
        vllm_config=SimpleNamespace(additional_config=HookSettings()),
        speculative_config=SimpleNamespace(num_speculative_tokens=GAMMA),
        requests={row["id"]: SimpleNamespace(sampling_params=SimpleNamespace(
            extra_args={"kad": row})) for row in rows},
        input_batch=SimpleNamespace(
            req_ids=req_ids, num_reqs=num_seqs, spec_token_ids=[[5] * GAMMA] * num_seqs,
            num_prompt_tokens=np.full(num_seqs, 10), sampling_metadata=metadata,
            generators={}),
        optimistic_seq_lens_cpu=torch.full((num_seqs,), 10 + 20 + GAMMA),
        discard_request_mask=SimpleNamespace(np=np.zeros(num_seqs, dtype=bool)),
    )


def real_step(rows: list[dict] | None = None) -> None:
    """One verification step of ``rows`` (default: ``NUM_SEQS`` mixed-rule requests with
    logprobs) through the wrapped ``_sample``, the upstream part faked as vLLM allocates."""
    rows = rows or _rows()
    num_seqs = len(rows)
    runner = fake_runner(rows)
    num_tokens = num_seqs * GAMMA
    width = GAMMA + 1
    # The proposal that made this step's drafts (vLLM's _draft_probs) and its record.
    proposal = torch.softmax(torch.randn(num_seqs, GAMMA, VOCAB), dim=-1)
    runner.input_batch.sampling_metadata.generators = {}
    vllm_patches._wrap_copy_draft_token_ids_to_cpu(lambda *a: None)(
        SimpleNamespace(**vars(runner), _draft_probs=proposal), None)
    logits = torch.randn(num_tokens + num_seqs, VOCAB)  # vLLM's target logits

    def upstream_sample(self, logits, metadata):
        draft_probs = vllm_patches._per_request_draft_probs(lambda *a: None)(self, metadata)
        target = logits[:num_tokens].clone()  # vLLM's processed target (temperature etc.)
        vllm_patches._wrap_rejection_sample(lambda *a, **k: None)(
            metadata.draft_token_ids, metadata.num_draft_tokens, GAMMA, None, draft_probs,
            target, None, None)
        sampled = torch.full((num_seqs, width), -1, dtype=torch.int32)
        sampled[:, :3] = 7
        logprobs = SimpleNamespace(
            logprob_token_ids=torch.zeros(num_seqs * width, TOP + 1, dtype=torch.int32),
            logprobs=torch.zeros(num_seqs * width, TOP + 1),
            selected_token_ranks=torch.zeros(num_seqs * width, dtype=torch.int32))
        return SimpleNamespace(sampled_token_ids=sampled, logprobs_tensors=logprobs)

    metadata = SimpleNamespace(num_draft_tokens=[GAMMA] * num_seqs,
                               draft_token_ids=torch.full((num_tokens,), 5))
    output = vllm_patches._wrap_sample(upstream_sample)(runner, logits, metadata)
    assert output.sampled_token_ids[:, 3:].eq(-1).all()  # the step ran to the end


def _peak(step) -> int:
    with LiveBytes() as meter:
        step()
    return meter.peak


def test_the_profile_run_reserves_at_least_a_real_steps_peak():
    real = _peak(real_step)
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
        hook.mix_target_logits(target, q_star, hook.StepPlan.build(
            rows, num_draft_tokens=[GAMMA] * NUM_SEQS))

    assert _peak(old_profile) < _peak(real_step)
