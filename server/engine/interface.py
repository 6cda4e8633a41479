"""The contract between the HTTP layer and the engine, free of vLLM types.

The server (and its tests, with a fake engine) program against ``Engine``; the vLLM-backed
implementation lives beside this module. Keeping vLLM out of this file keeps the HTTP layer
testable without starting an engine and makes the pinned-vLLM surface small.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from server.alignment import AlignmentSettings


@dataclass
class RequestStats:
    """Alignment statistics of one request (or running totals over many).

    ``alpha_sum``/``positions``: deferred mass summed over every verified draft position
    (positions where ``pi`` was computed); ``deferred_positions``: those with ``alpha > 0``.
    """

    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    positions: int = 0
    alpha_sum: float = 0.0
    deferred_positions: int = 0
    inexact: int = 0
    degraded: int = 0  # positions whose p or q* was NaN/inf: verified against p alone

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_alpha(self) -> float:
        return self.alpha_sum / self.positions if self.positions else 0.0

    @property
    def deferred_share(self) -> float:
        return self.deferred_positions / self.positions if self.positions else 0.0

    def add(self, other: RequestStats) -> None:
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.emitted += other.emitted
        self.positions += other.positions
        self.alpha_sum += other.alpha_sum
        self.deferred_positions += other.deferred_positions
        self.inexact += other.inexact
        self.degraded += other.degraded

    def as_dict(self) -> dict[str, Any]:
        return {
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "emitted_tokens": self.emitted,
            "acceptance_rate": self.acceptance_rate,
            "mean_deferred_mass": self.mean_alpha,
            "deferred_share": self.deferred_share,
            "inexact_tokens": self.inexact,
            "degraded_tokens": self.degraded,
        }


STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


class InvalidStructuredOutputError(ValueError):
    """A constraint the engine's structured-output backend cannot compile (a 400)."""


class InvalidSamplingFieldError(ValueError):
    """A sampling field the engine's own validation refuses (a 400 naming ``field``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the generated text, in vLLM's ``StructuredOutputsParams`` terms:
    ``kind`` ``json`` (``value``: a JSON schema), ``json_object`` (any JSON object),
    ``regex``, ``choice`` (a list of strings) or ``grammar`` (EBNF). Enforced on pi."""

    kind: str
    value: Any = True

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"unknown structured output kind {self.kind!r}")


@dataclass(frozen=True)
class SamplingOptions:
    """What one generation needs besides the prompt; temperature 0 means greedy argmax of pi."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0  # on p before mixing, as vLLM applies it to its target
    presence_penalty: float = 0.0  # generated tokens only, on p before mixing
    frequency_penalty: float = 0.0  # per generated occurrence, on p before mixing
    # {token id: bias} added to p's logits before mixing; a bias of -100 bans the token
    # from pi itself (as everything below that forbids a token).
    logit_bias: tuple[tuple[int, float], ...] = ()
    bad_words: tuple[str, ...] = ()  # no output contains these words (forbidden in pi)
    min_tokens: int = 0  # end-of-text (and stop strings) forbidden before this many tokens
    # Logprobs of each generated token under pi (unscaled), with this many top
    # alternatives (0: the token's own only); None: no logprobs.
    logprobs: int | None = None
    # Also score the prompt: log pi of each prompt token given the ones before it (needs
    # ``logprobs``); ``max_tokens`` may then be 0.
    prompt_logprobs: bool = False
    # The generated text must follow this constraint (applied to pi, after mixing).
    structured: StructuredOutput | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log pi and its most likely alternatives, most likely first."""

    token_id: int
    logprob: float | None  # None: the first prompt token under echo (nothing precedes it)
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class GenerationChunk:
    """A delta of one request's output; the last one has ``finished`` and ``stats`` set."""

    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stats: RequestStats | None = None
    prompt_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for
    # The prompt's entries (the first has logprob None), in one chunk, when asked for.
    prompt_logprobs: list[TokenLogprob] | None = None


class Engine(Protocol):
    """What the server needs from an engine; ``server.engine`` provides the vLLM one."""

    served_model_name: str
    max_model_len: int
    default_alignment: AlignmentSettings
    tokenizer: Any  # Hugging Face tokenizer of the aligned model (owns the chat template)
    # The engine's own Prometheus registry (vLLM's vllm:* metrics), merged into /metrics;
    # None when the engine has none.
    metrics_registry: Any

    async def start(self) -> None:
        """Load models and start the engine (slow); ``ready`` turns True when it returns."""
        ...

    @property
    def ready(self) -> bool: ...

    @property
    def errored(self) -> bool: ...

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingOptions,
        alignment: AlignmentSettings,
    ) -> AsyncIterator[GenerationChunk]:
        """The request's chunks. Closing the iterator before its last chunk (``aclose``, or
        cancelling the task consuming it) aborts the request in the engine: the only way to
        abort, so there is no separate ``abort(request_id)``."""
        ...

    def num_unfinished_requests(self) -> int: ...

    def totals(self) -> dict[str, RequestStats]:
        """Running totals keyed by rule name, for /metrics."""
        ...

    async def shutdown(self) -> None: ...


__all__ = ["Engine", "GenerationChunk", "RequestStats", "SamplingOptions", "TokenLogprob"]
