"""Do the target and the draft read token ids as the same text? (vLLM does not compare.)

Speculative decoding hands the draft's token ids to the target: if the two tokenizers map
an id to different text, the target scores a different text than the draft proposed. vLLM
only compares vocabulary *sizes*; these checks load both tokenizers and compare probe texts,
added tokens and the served tokenizer's length against the models' embedding tables.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from server.engine.preflight_error import PreflightError

logger = logging.getLogger(__name__)

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


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "vocab.txt", "spiece.model", "merges.txt")


def load_tokenizer(path: str) -> Any | None:
    """``AutoTokenizer`` for a local directory or a cached hub id; None when unavailable."""
    if Path(path).is_dir() and not any((Path(path) / name).is_file()
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
