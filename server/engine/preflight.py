"""Start-up checks that are kad-serve's own, on top of vLLM's own config validation.

vLLM's ``EngineArgs.create_engine_config()`` is the source of truth for what vLLM checks
(context length against the models' position limits, tensor-parallel shapes against head
counts, equal vocabulary sizes of target and draft): it runs here, before any weight
loads, and its refusal becomes one start-up line naming the config key
(:class:`PreflightError`). vLLM checks the draft's tensor-parallel size only when the
workers start (``DraftModelProposer._raise_if_draft_tp_mismatch``); that same function is
called here on the built config. What is kad-serve's alone:

* the headroom policy: the public limit (prompt + completion, what the API enforces) plus
  ``2 gamma + 2`` positions of headroom must fit the position limit vLLM derives for the
  pair; a config asking for the limit itself is served at ``limit - headroom``;
* tokenizer agreement between target and draft (same ids for probe texts, same added
  tokens), which vLLM does not compare;
* the stop ids (the target's ``generation_config.json`` eos ids and the served tokenizer's
  eos), reported in the start-up summary.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.config import ServeConfig

logger = logging.getLogger(__name__)


from server.engine.preflight_error import PreflightError
from server.engine.tokenizer_agreement import check_tokenizers, load_tokenizer


@dataclass
class PreflightResult:
    """What the engine uses from the checks.

    ``vllm_config``: vLLM's validated ``VllmConfig`` the engine starts from.
    ``public_max_model_len``: prompt + completion tokens the API allows.
    ``engine_max_model_len``: vLLM's ``max_model_len`` (public + ``headroom``), never more
    than ``model_position_limit``, the smaller of the two models' limits as vLLM derives them.
    ``stop_token_ids``: the target's eos ids and the served tokenizer's eos; the engine
    in the start-up summary.
    """

    vllm_config: Any
    public_max_model_len: int
    engine_max_model_len: int
    headroom: int
    model_position_limit: int
    stop_token_ids: list[int]
    draft_tensor_parallel_size: int = 1
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"max_model_len {self.public_max_model_len} public + {self.headroom} headroom = "
            f"{self.engine_max_model_len} engine (model limit {self.model_position_limit}); "
            f"stop ids {self.stop_token_ids}"
        )


def headroom(config: ServeConfig) -> int:
    """Positions vLLM needs past the public limit: the bonus position, one step of
    ``gamma`` scheduled drafts, ``gamma`` more for the drafter, and one spare.

    vLLM 0.32 skips drafting for the *whole batch* when any request's sequence plus its
    scheduled drafts plus ``gamma`` would pass the draft's ``max_model_len``
    (``GPUModelRunner._input_fits_in_drafter``, on the batch's longest sequence); then every
    request's next drafts have no q* and could not be verified against pi. With
    ``2 gamma + 2`` positions past the public limit that never happens.
    """
    return 2 * config.engine.num_speculative_tokens + 2


def resolve_max_model_len(
    requested: int | None,
    headroom: int,
    target_limit: int | None,
    draft_limit: int | None,
) -> tuple[int, int]:
    """``(public_len, engine_len)`` with ``engine_len = public_len + headroom`` never above
    ``min(target_limit, draft_limit)`` (vLLM's derived limits; None: unknown).

    * ``requested`` above the limit: :class:`PreflightError` naming the requested length,
      the limit, the headroom and the largest length allowed;
    * ``limit - headroom < requested <= limit`` (e.g. a config that asks exactly the
      model's length, as OLMo 2's 4096): the public limit becomes ``limit - headroom``,
      with a warning;
    * otherwise (or with no known limit) ``requested`` as asked.

    ``requested`` None means "as long as the models allow".
    """
    limits = [limit for limit in (target_limit, draft_limit) if limit is not None]
    if not limits:
        if requested is None:
            raise PreflightError(
                "max_model_len is not set and neither model's position limit could be read; "
                "set engine.max_model_len in the config"
            )
        return requested, requested + headroom
    limit = min(limits)
    which = _limit_owner(target_limit, draft_limit)
    allowed = limit - headroom
    if allowed < 1:
        raise PreflightError(
            f"the {which} has only {limit} positions, fewer than the {headroom} positions of "
            f"headroom the engine needs (2 x num_speculative_tokens + 2); lower "
            f"num_speculative_tokens"
        )
    if requested is None:
        return allowed, limit
    if requested < 1:
        raise PreflightError(f"max_model_len must be positive, got {requested}")
    if requested > limit:
        raise PreflightError(
            f"engine.max_model_len {requested} is more than the {limit} positions of the "
            f"{which}; the engine also needs {headroom} positions of headroom "
            f"(2 x num_speculative_tokens + 2), so the largest max_model_len is {allowed}"
        )
    if requested > allowed:
        logger.warning(
            "engine.max_model_len %d leaves no room for the engine's %d positions of headroom "
            "(2 x num_speculative_tokens + 2) within the %d positions of the %s; serving "
            "max_model_len %d instead (prompt + completion)",
            requested, headroom, limit, which, allowed,
        )
        return allowed, limit
    return requested, requested + headroom


def _limit_owner(target_limit: int | None, draft_limit: int | None) -> str:
    if target_limit is not None and draft_limit is not None and draft_limit < target_limit:
        return "draft model"
    if target_limit is not None and draft_limit is not None and draft_limit == target_limit:
        return "target and draft models"
    return "target model" if target_limit is not None else "draft model"


# ---------------------------------------------------------------------------- vLLM's config

# vLLM's message -> the config key to change (the first match names it).
_CONFIG_KEYS = (
    ("draft_tensor_parallel_size", "engine.draft_tensor_parallel_size"),
    ("tensor parallel", "engine.tensor_parallel_size"),
    ("tensor_parallel_size", "engine.tensor_parallel_size"),
    ("max_model_len", "engine.max_model_len"),
    ("vocab", "models.target / models.draft"),
    ("dtype", "engine.dtype"),
)


def vllm_config_error(exc: Exception) -> PreflightError:
    """vLLM's refusal as one line naming the config key (pydantic's framing dropped: the
    first 'Value error, ...' line, else the last line of the message)."""
    text = str(exc)
    found = re.search(r"Value error, (.+?)(?: \[type=|$)", text, flags=re.MULTILINE)
    reason = (found.group(1) if found else text.strip().splitlines()[-1]).strip()
    key = next((key for word, key in _CONFIG_KEYS if word in reason.lower()), "engine")
    return PreflightError(f"{key}: vLLM refuses this config: {reason}")


def build_vllm_config(args: Any) -> Any:
    """``args.create_engine_config()`` plus vLLM's draft tensor-parallel rule, which vLLM
    itself applies only when the workers start; no weights are read."""
    from vllm.v1.spec_decode.draft_model import DraftModelProposer

    try:
        vllm_config = args.create_engine_config()
        if vllm_config.speculative_config is not None:
            DraftModelProposer._raise_if_draft_tp_mismatch(
                SimpleNamespace(speculative_config=vllm_config.speculative_config))
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        raise vllm_config_error(exc) from exc
    except OSError as exc:  # a model or tokenizer vLLM cannot read (path, hub, network)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PreflightError(f"models.target / models.draft: vLLM cannot read a model: "
                             f"{reason}") from exc
    return vllm_config


def _limits(vllm_config: Any) -> tuple[int, int]:
    """``(target, draft)`` position limits as vLLM derived them (``max_model_len`` unset;
    the draft's is already capped at the target's by vLLM)."""
    speculative = vllm_config.speculative_config
    return (vllm_config.model_config.max_model_len,
            speculative.draft_model_config.max_model_len)


# ---------------------------------------------------------------------------- stop ids


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping)):
        return [item for item in value if isinstance(item, int) and not isinstance(item, bool)]
    return []


def model_eos_token_ids(path: str) -> tuple[list[int], str | None]:
    """``(ids, source)``: the model's ``generation_config.json`` ``eos_token_id`` (an int
    or a list), else its ``config.json`` one (as transformers' GenerationConfig falls back),
    for a local directory or a cached hub id; ``([], None)`` when neither says."""
    from transformers import AutoConfig, GenerationConfig

    loaders = (
        ("generation_config.json",
         lambda: GenerationConfig.from_pretrained(path, local_files_only=True)),
        ("config.json",
         lambda: AutoConfig.from_pretrained(path, local_files_only=True).get_text_config()),
    )
    for source, load in loaders:
        try:
            ids = _as_id_list(getattr(load(), "eos_token_id", None))
        except Exception as exc:  # noqa: BLE001 - absent, not cached, or an unknown type
            logger.debug("preflight: no %s for %s (%s)", source, path, exc)
            continue
        if ids:
            return list(dict.fromkeys(ids)), source
    return [], None


def stop_token_ids(target_path: str, tokenizer: Any | None = None) -> list[int]:
    """The ids generation stops on, as vLLM stops: the target's eos ids
    (:func:`model_eos_token_ids`) followed by the served tokenizer's eos when not among
    them (vLLM's primary eos). Falls back to the target tokenizer's eos."""
    ids, _ = model_eos_token_ids(target_path)
    if tokenizer is None and not ids:
        tokenizer = load_tokenizer(target_path)
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if isinstance(eos, int) and eos not in ids:
        ids = [*ids, eos]
    return ids


# ---------------------------------------------------------------------------- entry point


def run_preflight(config: ServeConfig, engine_args: Any = None) -> PreflightResult:
    """All checks for a config; raises :class:`PreflightError` with the reason, else returns
    vLLM's validated config, the lengths and the stop ids the engine should use.

    ``engine_args(config, max_model_len)`` builds vLLM's engine arguments (default: the
    engine's own); vLLM derives the models' limits from a first build without a length,
    then validates the one the engine will run.
    """
    if engine_args is None:
        from server.engine.vllm_engine import engine_args_for_length as engine_args
    models = config.models
    notes: list[str] = []
    room = headroom(config)
    derived = build_vllm_config(engine_args(config, None))
    target_limit, draft_limit = _limits(derived)
    public, engine_len = resolve_max_model_len(
        config.engine.max_model_len, room, target_limit, draft_limit)
    if config.engine.max_model_len is not None and public != config.engine.max_model_len:
        notes.append(f"engine.max_model_len {config.engine.max_model_len} lowered to "
                     f"{public} so that the {room} positions of headroom fit the models' "
                     f"{engine_len}")
    vllm_config = (derived if engine_len == derived.model_config.max_model_len
                   else build_vllm_config(engine_args(config, engine_len)))

    target_vocab = vllm_config.model_config.get_vocab_size()
    draft_vocab = vllm_config.speculative_config.draft_model_config.get_vocab_size()
    served, tokenizer_notes = check_tokenizers(
        models.target, models.draft, models.tokenizer, target_vocab, draft_vocab)
    notes += tokenizer_notes
    _, source = model_eos_token_ids(models.target)
    stops = stop_token_ids(models.target, served)
    if not stops:
        notes.append("no eos id found in the target's generation_config.json, config.json "
                     "or the tokenizer; generation stops only at max_tokens or stop strings")
    elif source is None:
        notes.append(f"the target has no eos_token_id in generation_config.json or "
                     f"config.json; stopping on the tokenizer's eos {stops}")

    result = PreflightResult(
        vllm_config=vllm_config,
        public_max_model_len=public,
        engine_max_model_len=engine_len,
        headroom=room,
        model_position_limit=min(target_limit, draft_limit),
        stop_token_ids=stops,
        draft_tensor_parallel_size=(
            vllm_config.speculative_config.draft_parallel_config.tensor_parallel_size),
        notes=notes,
    )
    for note in notes:
        logger.info("preflight: %s", note)
    logger.info("preflight: %s", result.summary())
    return result
