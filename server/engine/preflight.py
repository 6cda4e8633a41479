"""Start-up checks on the model pair, before vLLM is built (pure Python, no vLLM import).

vLLM refuses to start when it is asked for more positions than a model has, and it checks
tokenizers and tensor-parallel shapes late (or not at all for a draft model). These checks
read the model directories' ``config.json`` / ``generation_config.json`` and tokenizers and
fail early with a message that names the numbers:

* the context length: the public limit (prompt + completion, what the API enforces) plus the
  engine's headroom (``num_speculative_tokens + 2``: the withheld prompt token and one step
  of drafts past the limit) must fit the smaller of the two models' position limits;
* tokenizer agreement between target and draft (same ids for probe texts, same added
  tokens; vocabularies may differ only by padding);
* the stop ids vLLM will stop on (the target's ``generation_config.json`` eos ids and the
  served tokenizer's eos);
* tensor-parallel sizes against the attention and KV head counts of both models.

A model path that is not a local directory is taken as a hub id: what transformers can load
from its local cache is used, otherwise the file-based checks are skipped with a note and
vLLM is left to check. The engine calls :func:`run_preflight` once and uses
``engine_max_model_len`` for vLLM, ``public_max_model_len`` for the API and
``stop_token_ids`` for its withheld-token check.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.config import ServeConfig

logger = logging.getLogger(__name__)


class PreflightError(ValueError):
    """The model pair cannot be served with this config; the message says why and how."""


# vLLM 0.32 ModelArchConfigConvertorBase.derive_max_model_len_and_key: the smallest of
# these keys in the (text) config wins, then ``model_max_length`` (Command-R / Cohere)
# overrides them all when it is set.
POSITION_KEYS = (
    "max_position_embeddings",  # Llama, Qwen2/3, OLMo 2, most models
    "n_positions",  # GPT-2
    "max_seq_len",  # MPT
    "seq_length",  # ChatGLM2
    "model_max_length",  # Command-R
    "max_target_positions",  # Whisper
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# vLLM 0.32 _get_and_verify_max_len: the RoPE ``factor`` multiplies the derived length,
# except for these types whose max_position_embeddings is already the scaled length.
_ROPE_TYPES_ALREADY_SCALED = frozenset(
    {"su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling"}
)
# vLLM 0.32 ModelArchConfigConvertorBase.get_total_num_kv_heads: the first present wins,
# else the model has as many KV heads as attention heads.
KV_HEAD_KEYS = (
    "n_head_kv",
    "num_kv_heads",
    "num_key_value_heads",
    "multi_query_group_num",
    "num_attention_groups",
)
# Texts both tokenizers must turn into the same ids: prose, numbers, code, whitespace runs,
# several scripts and emoji (byte fallback). The served tokenizer's added tokens are probed
# as well (see _probe_texts).
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. Let's think step by step.",
    "Natalia sold 48 / 2 = 24 clips; 1,000 + 2,500 = 3,500 and -4.75e-3 * 12 = 0.057.",
    "def mean(xs: list[float]) -> float:\n    return sum(xs) / max(len(xs), 1)  # {a: [1]}\n",
    "   leading spaces,\ttabs\tand\n\n\nblank lines   \r\n",
    "Unicode: naïve café, Straße, Ελληνικά, Привет, 東京タワー, 한국어, मराठी, 😀👍🏽 ∑∫√≠",
)


@dataclass(frozen=True)
class ModelFacts:
    """What the checks read from one model's config (None: unknown)."""

    path: str
    local: bool
    position_limit: int | None = None
    position_key: str | None = None
    num_attention_heads: int | None = None
    num_kv_heads: int | None = None
    vocab_size: int | None = None


@dataclass
class PreflightResult:
    """What the engine uses from the checks.

    ``public_max_model_len``: prompt + completion tokens the API allows.
    ``engine_max_model_len``: vLLM's ``max_model_len`` (public + ``headroom``); never more
    than ``model_position_limit`` when that is known.
    ``stop_token_ids``: ids generation stops on, as vLLM stops: the target's
    ``generation_config.json`` eos ids (else its ``config.json`` eos) and the served
    tokenizer's eos; the engine does not withhold a prompt's last token when it is one.
    ``notes``: human-readable findings that did not stop the start (also logged).
    """

    public_max_model_len: int
    engine_max_model_len: int
    headroom: int
    stop_token_ids: list[int]
    target: ModelFacts
    draft: ModelFacts
    model_position_limit: int | None = None
    target_eos_token_ids: list[int] = field(default_factory=list)
    tokenizer_eos_token_id: int | None = None
    draft_tensor_parallel_size: int = 1
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        limit = "unknown" if self.model_position_limit is None else self.model_position_limit
        return (
            f"max_model_len {self.public_max_model_len} public + {self.headroom} headroom = "
            f"{self.engine_max_model_len} engine (model limit {limit}); "
            f"stop ids {self.stop_token_ids}"
        )


def headroom(config: ServeConfig) -> int:
    """Positions vLLM needs past the public limit: the withheld prompt token, the bonus
    position, one step of ``gamma`` scheduled drafts, and ``gamma`` more for the drafter.

    vLLM 0.32 skips drafting for the *whole batch* when any request's sequence plus its
    scheduled drafts plus ``gamma`` would pass the draft's ``max_model_len``
    (``GPUModelRunner._input_fits_in_drafter``, on the batch's longest sequence); then every
    request's next drafts have no q* and could not be verified against pi. With
    ``2 gamma + 2`` positions past the public limit that never happens.
    """
    return 2 * config.engine.num_speculative_tokens + 2


# ---------------------------------------------------------------------------- model config


def _is_local_dir(path: str) -> bool:
    return Path(path).is_dir()


def _get(config: Any, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def _text_config(config: Any) -> Any:
    """The language-model part of a config, as vLLM's ``get_hf_text_config``."""
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        try:
            return get_text_config()
        except Exception:  # noqa: BLE001 - odd remote-code configs; use the config itself
            return config
    text = _get(config, "text_config")
    return text if isinstance(text, Mapping) else config


def load_model_config(path: str) -> Any | None:
    """The model's (text) config: transformers' ``AutoConfig`` when it knows the model type
    (class defaults included, as vLLM sees it), else the raw ``config.json``; for a hub id
    whatever the local cache holds. None when nothing can be read without the network."""
    local = _is_local_dir(path)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        return _text_config(config)
    except Exception as exc:  # noqa: BLE001 - unknown model type, no cache, no network
        if not local:
            logger.info("preflight: %s is not a local directory and not in the local cache "
                        "(%s); skipping its file-based checks", path, type(exc).__name__)
            return None
    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        logger.warning("preflight: cannot read %s/config.json (%s)", path, exc)
        return None
    return _text_config(raw) if isinstance(raw, dict) else None


def _rope_parameters(config: Any) -> Iterator[Mapping[str, Any]]:
    """RoPE settings, one mapping per layer type when nested (transformers 5
    ``rope_parameters``; ``rope_scaling`` in older configs)."""
    for key in ("rope_parameters", "rope_scaling"):
        params = _get(config, key)
        if not isinstance(params, Mapping) or not params:
            continue
        nested = [value for value in params.values() if isinstance(value, Mapping)]
        if nested and len(nested) == len(params):
            yield from (value for value in nested if value)
        else:
            yield params
        return


def position_limit_from_config(config: Any) -> tuple[int, str] | None:
    """``(positions, key)`` as vLLM 0.32 derives a model's maximum length from its config
    (``_get_and_verify_max_len``): the smallest of :data:`POSITION_KEYS`, overridden by
    ``model_max_length`` when set, times the RoPE scaling ``factor`` unless the RoPE type
    already scales ``max_position_embeddings`` (YaRN, Llama 3, LongRoPE, ...). None when the
    config has none of the keys (vLLM then assumes 2048 for a target; a draft inherits the
    target's length).

    Not mirrored (off in this server): a disabled sliding window, a tokenizer's
    ``model_max_length`` (vLLM reads it for pooling models only), encoder configs.
    """
    derived: float | None = None
    key_used: str | None = None
    for key in POSITION_KEYS:
        value = _get(config, key)
        if (isinstance(value, (int, float)) and not isinstance(value, bool)
                and (derived is None or value < derived)):
            derived, key_used = value, key
    override = _get(config, "model_max_length")
    if isinstance(override, (int, float)) and not isinstance(override, bool) and override:
        derived, key_used = override, "model_max_length"
    if derived is None:
        return None
    model_type = str(_get(config, "model_type") or "")
    if "gemma3" not in model_type:
        factor: Any = 1.0
        scaled = False
        for params in _rope_parameters(config):
            rope_type = params.get("rope_type") or params.get("type") or "default"
            if rope_type not in _ROPE_TYPES_ALREADY_SCALED:
                factor = params.get("factor", factor)
                scaled = True
        if scaled:
            factor = 1.0 if factor is None else float(factor)
            if factor != 1.0:
                key_used = f"{key_used} x rope factor {factor:g}"
            derived *= factor
    return int(derived), str(key_used)


def model_position_limit(path: str) -> int | None:
    """The model's own maximum length as vLLM derives it (see
    :func:`position_limit_from_config`); None when it cannot be read."""
    config = load_model_config(path)
    if config is None:
        return None
    found = position_limit_from_config(config)
    return None if found is None else found[0]


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def model_facts(path: str) -> ModelFacts:
    """Position limit, head counts and vocabulary size of one model (None where unknown)."""
    config = load_model_config(path)
    local = _is_local_dir(path)
    if config is None:
        return ModelFacts(path=path, local=local)
    found = position_limit_from_config(config)
    heads = _int_or_none(_get(config, "num_attention_heads"))
    kv_heads = None
    for key in KV_HEAD_KEYS:
        kv_heads = _int_or_none(_get(config, key))
        if kv_heads is not None:
            break
    return ModelFacts(
        path=path,
        local=local,
        position_limit=None if found is None else found[0],
        position_key=None if found is None else found[1],
        num_attention_heads=heads,
        num_kv_heads=heads if kv_heads is None else kv_heads,
        vocab_size=_int_or_none(_get(config, "vocab_size")),
    )


# ---------------------------------------------------------------------------- context length


def resolve_max_model_len(
    requested: int | None,
    headroom: int,
    target_limit: int | None,
    draft_limit: int | None,
) -> tuple[int, int]:
    """``(public_len, engine_len)`` with ``engine_len = public_len + headroom`` never above
    ``min(target_limit, draft_limit)`` (unknown limits are left out).

    * ``requested`` above the limit: :class:`PreflightError` naming the requested length,
      the limit, the headroom and the largest length allowed;
    * ``limit - headroom < requested <= limit`` (e.g. a config that asks exactly the
      model's length, as OLMo 2's 4096): the public limit becomes ``limit - headroom``,
      with a warning;
    * otherwise (or with no known limit) ``requested`` as asked.

    ``requested`` None means "as long as the models allow".
    """
    if headroom < 0:
        raise ValueError(f"headroom must be >= 0, got {headroom}")
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
            f"headroom the engine needs (num_speculative_tokens + 2); lower "
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
            f"(num_speculative_tokens + 2), so the largest max_model_len is {allowed}"
        )
    if requested > allowed:
        logger.warning(
            "engine.max_model_len %d leaves no room for the engine's %d positions of headroom "
            "(num_speculative_tokens + 2) within the %d positions of the %s; serving "
            "max_model_len %d instead (prompt + completion)",
            requested, headroom, limit, which, allowed,
        )
        return allowed, limit
    return requested, requested + headroom


def _limit_owner(target_limit: int | None, draft_limit: int | None) -> str:
    if target_limit is None:
        return "draft model"
    if draft_limit is None or target_limit < draft_limit:
        return "target model"
    if draft_limit < target_limit:
        return "draft model"
    return "target and draft models"


# ---------------------------------------------------------------------------- tokenizers


# Files one of which a directory needs to hold a tokenizer (transformers otherwise builds an
# empty tokenizer of the config's model type).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "vocab.txt", "spiece.model", "merges.txt")


def load_tokenizer(path: str) -> Any | None:
    """``AutoTokenizer`` for a local directory or a cached hub id; None when unavailable."""
    if _is_local_dir(path) and not any((Path(path) / name).is_file()
                                       for name in _TOKENIZER_FILES):
        logger.info("preflight: no tokenizer files in %s", path)
        return None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - no tokenizer files, no cache, odd classes
        logger.info("preflight: no tokenizer loadable from %s (%s: %s)", path,
                    type(exc).__name__, exc)
        return None
    if len(tokenizer) == 0 or not tokenizer.encode("a b", add_special_tokens=False):
        logger.info("preflight: the tokenizer in %s is empty", path)
        return None
    return tokenizer


def _probe_texts(first: Any, second: Any) -> list[str]:
    """:data:`PROBE_TEXTS` and one text around the added tokens both tokenizers know (those
    only one knows are checked by id in :func:`compare_tokenizers`)."""
    texts = list(PROBE_TEXTS)
    known = second.get_vocab()
    added = sorted((item for item in first.get_added_vocab().items() if item[0] in known),
                   key=lambda item: item[1])
    if added:
        texts.append("".join(f"{content}user\n12 + 3{content} " for content, _ in added[:64]))
    return texts


def _roles(tokenizer: Any) -> dict[str, tuple[str | None, int | None]]:
    return {
        role: (getattr(tokenizer, f"{role}_token", None),
               getattr(tokenizer, f"{role}_token_id", None))
        for role in ("bos", "eos", "pad", "unk")
    }


def compare_tokenizers(
    first: Any,
    second: Any,
    names: tuple[str, str] = ("draft", "target"),
    vocab_sizes: tuple[int | None, int | None] = (None, None),
) -> list[str]:
    """Raise :class:`PreflightError` unless both tokenizers give the same ids: probe texts
    encode identically and no token (added/special ones included) has a different id or a
    different text in the two. Returns notes for harmless differences: special-token roles
    (a chat model's eos is often ``<|im_end|>`` where its base model's is
    ``<|endoftext|>``; the served tokenizer's roles apply) and added tokens one tokenizer
    lacks but whose id still falls inside that model's (padded) embedding table."""
    problems: list[str] = []
    notes: list[str] = []
    a_name, b_name = names
    for text in _probe_texts(first, second) + _probe_texts(second, first)[len(PROBE_TEXTS):]:
        a_ids = first.encode(text, add_special_tokens=False)
        b_ids = second.encode(text, add_special_tokens=False)
        if a_ids != b_ids:
            at = next((i for i, (x, y) in enumerate(zip(a_ids, b_ids)) if x != y),
                      min(len(a_ids), len(b_ids)))
            problems.append(
                f"{text[:40]!r}... encodes differently: {a_name} ids {a_ids[at:at + 6]} vs "
                f"{b_name} ids {b_ids[at:at + 6]} at position {at}"
            )
            break
    vocabs = (first.get_vocab(), second.get_vocab())
    sizes = (len(first), len(second))
    for (src, dst), (src_name, dst_name) in (((0, 1), names), ((1, 0), names[::-1])):
        tokenizers = (first, second)
        for content, token_id in sorted(tokenizers[src].get_added_vocab().items(),
                                        key=lambda item: item[1]):
            other_id = vocabs[dst].get(content)
            if other_id == token_id:
                continue
            if other_id is not None:
                problems.append(f"token {content!r} is id {token_id} in the {src_name} "
                                f"tokenizer but id {other_id} in the {dst_name} tokenizer")
            elif token_id < sizes[dst]:
                other = tokenizers[dst].convert_ids_to_tokens(token_id)
                problems.append(f"id {token_id} is {content!r} in the {src_name} tokenizer "
                                f"but {other!r} in the {dst_name} tokenizer")
            elif vocab_sizes[dst] is not None and token_id >= vocab_sizes[dst]:
                problems.append(f"token {content!r} (id {token_id}) of the {src_name} "
                                f"tokenizer is beyond the {dst_name} model's vocab_size "
                                f"{vocab_sizes[dst]}")
            elif vocab_sizes[dst] is None:
                notes.append(f"token {content!r} (id {token_id}) of the {src_name} tokenizer "
                             f"is unknown to the {dst_name} tokenizer and the {dst_name} "
                             f"model's vocab_size is unknown; check that it has the id")
            else:
                notes.append(f"token {content!r} (id {token_id}) of the {src_name} tokenizer "
                             f"is unknown to the {dst_name} tokenizer; the {dst_name} model "
                             f"has an embedding row for it (vocabulary padding)")
    if problems:
        shown = "; ".join(dict.fromkeys(problems[:8]))
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise PreflightError(
            f"the {a_name} and {b_name} tokenizers disagree, so the two models would read "
            f"different text from the same token ids: {shown}{more}"
        )
    a_roles, b_roles = _roles(first), _roles(second)
    for role in a_roles:
        if a_roles[role][1] != b_roles[role][1]:
            notes.append(
                f"{role} token differs: {a_name} {a_roles[role][0]!r} "
                f"({a_roles[role][1]}), {b_name} {b_roles[role][0]!r} ({b_roles[role][1]}); "
                f"both vocabularies agree on these tokens, the served tokenizer's {role} applies"
            )
    return notes


def check_tokenizers(
    target_path: str,
    draft_path: str,
    tokenizer_path: str | None = None,
    target_vocab_size: int | None = None,
    draft_vocab_size: int | None = None,
) -> tuple[Any | None, list[str]]:
    """Load the served tokenizer (``tokenizer_path`` or the draft's) and compare it with the
    target's (and the draft's own, when a separate tokenizer is served). Its length must
    fit both models' ``vocab_size`` (larger vocab sizes are embedding padding). Returns the
    served tokenizer (None when it could not be loaded) and notes."""
    notes: list[str] = []
    served_path = tokenizer_path or draft_path
    served = load_tokenizer(served_path)
    if served is None:
        notes.append(f"tokenizer {served_path} could not be loaded locally; tokenizer "
                     f"checks skipped")
        return None, notes
    served_name = "draft" if served_path == draft_path else "served"
    sizes = {"target": target_vocab_size, "draft": draft_vocab_size}
    too_small = {name: size for name, size in sizes.items()
                 if size is not None and len(served) > size}
    if too_small:
        listed = ", ".join(f"{name} vocab_size {size}" for name, size in too_small.items())
        raise PreflightError(
            f"the {served_name} tokenizer ({served_path}) has {len(served)} tokens, more "
            f"than the models' embedding tables hold ({listed}); ids past the table would "
            f"crash or be read as padding"
        )
    if target_vocab_size is not None and draft_vocab_size is not None \
            and target_vocab_size != draft_vocab_size:
        notes.append(f"vocab_size differs (target {target_vocab_size}, draft "
                     f"{draft_vocab_size}); the tokenizer uses {len(served)} ids, the rest "
                     f"is padding")
    others = [("target", target_path, target_vocab_size)]
    if served_path != draft_path:
        others.append(("draft", draft_path, draft_vocab_size))
    for name, path, vocab_size in others:
        if path == served_path:
            continue
        other = load_tokenizer(path)
        if other is None:
            notes.append(f"no tokenizer in the {name} model {path}; cannot check that it "
                         f"reads token ids as the {served_name} tokenizer does")
            continue
        # The served tokenizer feeds the draft; its side of the padding rule is the draft's.
        notes += compare_tokenizers(served, other, (served_name, name),
                                    (draft_vocab_size, vocab_size))
    return served, notes


# ---------------------------------------------------------------------------- stop ids


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping)):
        return [item for item in value if isinstance(item, int) and not isinstance(item, bool)]
    return []


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def model_eos_token_ids(path: str) -> tuple[list[int], str | None]:
    """``(ids, source)``: the model's ``generation_config.json`` ``eos_token_id`` (an int
    or a list), else its ``config.json`` one (as transformers' GenerationConfig falls back);
    ``([], None)`` when neither says."""
    if _is_local_dir(path):
        for name in ("generation_config.json", "config.json"):
            data = _read_json(Path(path) / name)
            if data is None:
                continue
            ids = _as_id_list(data.get("eos_token_id"))
            if not ids and isinstance(data.get("text_config"), dict):
                ids = _as_id_list(data["text_config"].get("eos_token_id"))
            if ids:
                return list(dict.fromkeys(ids)), name
        return [], None
    try:
        from transformers import GenerationConfig

        generation = GenerationConfig.from_pretrained(path, local_files_only=True)
        ids = _as_id_list(generation.eos_token_id)
        if ids:
            return list(dict.fromkeys(ids)), "generation_config.json"
    except Exception as exc:  # noqa: BLE001 - not cached: fall back to the config
        logger.debug("preflight: no generation config for %s (%s)", path, exc)
    config = load_model_config(path)
    ids = _as_id_list(_get(config, "eos_token_id")) if config is not None else []
    return (list(dict.fromkeys(ids)), "config.json") if ids else ([], None)


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


# ---------------------------------------------------------------------------- parallelism


def check_tensor_parallel(name: str, facts: ModelFacts, tensor_parallel_size: int) -> None:
    """vLLM's shape rules for ``tensor_parallel_size``: attention heads divisible by it
    (ModelConfig.verify_with_parallel_config) and KV heads either divisible by it or
    dividing it (QKVParallelLinear replicates KV heads when there are fewer than GPUs)."""
    tp = tensor_parallel_size
    heads, kv_heads = facts.num_attention_heads, facts.num_kv_heads
    if tp <= 1:
        return
    if heads is not None and heads % tp:
        raise PreflightError(
            f"the {name} model ({facts.path}) has {heads} attention heads, which "
            f"tensor_parallel_size {tp} does not divide; use a divisor of {heads}"
        )
    if kv_heads is not None and kv_heads > 0 and (kv_heads % tp if tp < kv_heads
                                                  else tp % kv_heads):
        raise PreflightError(
            f"the {name} model ({facts.path}) has {kv_heads} KV heads and tensor_parallel_size "
            f"{tp}: one must divide the other"
        )


def draft_tensor_parallel_size(config: ServeConfig) -> int:
    """The draft's TP size as vLLM 0.32 sets it (SpeculativeConfig._verify_and_get_draft_tp):
    the target's unless ``draft_tensor_parallel_size`` is set, which must be 1 or the
    target's."""
    engine = config.engine
    if engine.draft_tensor_parallel_size is None:
        return engine.tensor_parallel_size
    if engine.draft_tensor_parallel_size not in (1, engine.tensor_parallel_size):
        raise PreflightError(
            f"engine.draft_tensor_parallel_size {engine.draft_tensor_parallel_size} must be 1 "
            f"or the target's tensor_parallel_size {engine.tensor_parallel_size} (vLLM "
            f"draft_model speculative decoding)"
        )
    return engine.draft_tensor_parallel_size


# ---------------------------------------------------------------------------- entry point


def run_preflight(config: ServeConfig) -> PreflightResult:
    """All checks for a config; raises :class:`PreflightError` with the reason, else returns
    the lengths and stop ids the engine should use. Logs one summary line and each note."""
    models = config.models
    notes: list[str] = []
    target, draft = model_facts(models.target), model_facts(models.draft)
    for name, facts in (("target", target), ("draft", draft)):
        if facts.position_limit is None:
            where = "a local directory" if facts.local else "cached locally"
            notes.append(f"{name} model {facts.path}: position limit unknown (not {where} or "
                         f"no length key in its config); vLLM checks it at start")

    room = headroom(config)
    public, engine_len = resolve_max_model_len(
        config.engine.max_model_len, room, target.position_limit, draft.position_limit)
    if public != config.engine.max_model_len:
        notes.append(f"engine.max_model_len {config.engine.max_model_len} lowered to "
                     f"{public} so that the {room} positions of headroom fit the models' "
                     f"{engine_len}")
    limits = [x for x in (target.position_limit, draft.position_limit) if x is not None]

    draft_tp = draft_tensor_parallel_size(config)
    check_tensor_parallel("target", target, config.engine.tensor_parallel_size)
    check_tensor_parallel("draft", draft, draft_tp)

    served, tokenizer_notes = check_tokenizers(
        models.target, models.draft, models.tokenizer, target.vocab_size, draft.vocab_size)
    notes += tokenizer_notes

    target_eos, source = model_eos_token_ids(models.target)
    stops = stop_token_ids(models.target, served)
    if not stops and served is None and not target.local:
        notes.append("stop ids unknown (neither the target nor the tokenizer is available "
                     "locally); vLLM takes them from the models it loads")
    elif not stops:
        notes.append("no eos id found in the target's generation_config.json, config.json "
                     "or the tokenizer; generation stops only at max_tokens or stop strings")
    elif source is None:
        notes.append(f"the target has no eos_token_id in generation_config.json or "
                     f"config.json; stopping on the tokenizer's eos {stops}")

    result = PreflightResult(
        public_max_model_len=public,
        engine_max_model_len=engine_len,
        headroom=room,
        stop_token_ids=stops,
        target=target,
        draft=draft,
        model_position_limit=min(limits) if limits else None,
        target_eos_token_ids=target_eos,
        tokenizer_eos_token_id=getattr(served, "eos_token_id", None),
        draft_tensor_parallel_size=draft_tp,
        notes=notes,
    )
    for note in notes:
        logger.info("preflight: %s", note)
    logger.info("preflight: %s", result.summary())
    return result


__all__ = [
    "KV_HEAD_KEYS",
    "POSITION_KEYS",
    "PROBE_TEXTS",
    "ModelFacts",
    "PreflightError",
    "PreflightResult",
    "check_tensor_parallel",
    "check_tokenizers",
    "compare_tokenizers",
    "draft_tensor_parallel_size",
    "headroom",
    "load_model_config",
    "load_tokenizer",
    "model_eos_token_ids",
    "model_facts",
    "model_position_limit",
    "position_limit_from_config",
    "resolve_max_model_len",
    "run_preflight",
    "stop_token_ids",
]
