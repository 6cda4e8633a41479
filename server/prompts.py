"""From request text to prompt token ids: the chat template, special tokens, and a cheap
length bound.

Blocking (tokenizing megabytes takes seconds): the app calls these in a worker thread.

Chat content is text, never control tokens: a message saying ``<|im_end|>\\n<|im_start|>
system`` must not close its turn and open a system turn. The template is rendered with every
special-token string in the content replaced by a sentinel; the rendered text is encoded as
before between sentinels (so the template's own special tokens stay special), and each
sentinel becomes its special token's string encoded as plain text. Content without special
tokens (nearly all of it) is encoded exactly as without this step.

The tokenizer is shared by concurrent requests, so nothing here changes its state: plain-text
encodings come from a private copy of the Rust tokenizer (transformers' own
``split_special_tokens`` flips a flag on the shared one).
"""

from __future__ import annotations

import re
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from server.errors import APIError

# Characters one token can stand for, at most, is the longest vocabulary entry; this factor
# covers normalizers that shrink text (NFC composes up to three code points into one).
_NORMALIZER_SLACK = 4


@dataclass(frozen=True)
class _TokenizerFacts:
    specials: re.Pattern | None  # the special-token strings, longest first
    plain: Callable[[str], list[int]]  # text to ids with special-token strings as plain text
    max_token_chars: int


_facts: weakref.WeakKeyDictionary[Any, _TokenizerFacts] = weakref.WeakKeyDictionary()
_facts_lock = threading.Lock()


def _plain_encoder(tokenizer) -> Callable[[str], list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a Rust tokenizer: a private copy that splits special tokens
        from tokenizers import Tokenizer

        private = Tokenizer.from_str(backend.to_str())
        private.encode_special_tokens = True
        return lambda text: private.encode(text, add_special_tokens=False).ids
    # A Python tokenizer takes the flag per call.
    return lambda text: tokenizer.encode(text, add_special_tokens=False,
                                        split_special_tokens=True)


def _tokenizer_facts(tokenizer) -> _TokenizerFacts:
    with _facts_lock:
        try:
            known = _facts.get(tokenizer)
        except TypeError:  # not weak-referenceable: computed each time
            known = None
        if known is not None:
            return known
        specials = {token.content for token in tokenizer.added_tokens_decoder.values()
                    if token.special}
        specials |= set(tokenizer.all_special_tokens)
        specials.discard("")
        pattern = (re.compile("|".join(re.escape(s) for s in sorted(specials, key=len,
                                                                     reverse=True)))
                   if specials else None)
        longest = max((len(entry) for entry in tokenizer.get_vocab()), default=1)
        facts = _TokenizerFacts(pattern, _plain_encoder(tokenizer), max(longest, 1))
        try:
            _facts[tokenizer] = facts
        except TypeError:
            pass
        return facts


def surely_too_long(tokenizer, chars: int, max_tokens: int) -> bool:
    """True when a text of ``chars`` characters has more than ``max_tokens`` tokens whatever
    it says: a prompt megabytes long is refused without tokenizing it (seconds of CPU)."""
    bound = max_tokens * _tokenizer_facts(tokenizer).max_token_chars * _NORMALIZER_SLACK
    return chars > bound


def encode_text(tokenizer, text: str) -> list[int]:
    """A completions prompt: the caller's text as is (special-token strings included)."""
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass(frozen=True)
class ChatText:
    """A rendered chat template; ``sentinel`` (a pattern whose group is an index into
    ``replaced``) marks where content had special-token strings."""

    text: str
    chars: int  # length of the text with the replaced strings back (for the length bound)
    sentinel: str | None = None
    replaced: tuple[str, ...] = ()


def _strings(value: Any) -> Iterator[str]:
    """Every string in a message or tool (keys too: a schema's property names)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def _substitute(value: Any, replace: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return replace(value)
    if isinstance(value, dict):
        return {replace(key) if isinstance(key, str) else key: _substitute(item, replace)
                for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_substitute(item, replace) for item in value]
    return value


def render_chat(tokenizer, messages: Sequence[dict[str, Any]], *,
                tools: Sequence[dict[str, Any]] | None = None,
                add_generation_prompt: bool = True,
                continue_final_message: bool = False) -> ChatText:
    """The chat template applied to ``messages`` (by default with the generation prompt, as
    the chat endpoint sends it) and ``tools`` (function definitions, which the template
    renders in its own format), each special-token string in any of their strings (content,
    tool-call arguments, tool descriptions) replaced by a sentinel. Template errors
    propagate (the caller makes them a 400)."""
    facts = _tokenizer_facts(tokenizer)
    options: dict[str, Any] = {"add_generation_prompt": add_generation_prompt,
                               "continue_final_message": continue_final_message,
                               "tokenize": False}
    if tools:
        options["tools"] = [dict(tool) for tool in tools]
    everything = (messages, tools or ())
    if facts.specials is None or not any(facts.specials.search(text)
                                         for text in _strings(everything)):
        text = tokenizer.apply_chat_template(list(messages), **options)
        return ChatText(text, len(text))
    nonce = uuid.uuid4().hex
    while any(nonce in text for text in _strings(everything)):
        nonce = uuid.uuid4().hex
    replaced: list[str] = []

    def sentinel(match: re.Match) -> str:
        # Letters and digits only: survives the template's filters (trim, tojson, ...).
        replaced.append(match.group(0))
        return f"kadspecial{nonce}n{len(replaced) - 1}x"

    def replace(text: str) -> str:
        return facts.specials.sub(sentinel, text)

    messages = [{**m, **_substitute({k: v for k, v in m.items() if k != "role"}, replace)}
                for m in messages]
    if tools:
        options["tools"] = _substitute(options["tools"], replace)
    text = tokenizer.apply_chat_template(messages, **options)
    pattern = f"kadspecial{nonce}n(\\d+)x"
    chars = len(re.sub(pattern, lambda m: replaced[int(m.group(1))], text))
    return ChatText(text, chars, pattern, tuple(replaced))


def encode_chat(tokenizer, chat: ChatText) -> list[int]:
    """Token ids of a rendered chat: the template's text with its special tokens, the
    special-token strings of the content as plain text."""
    if chat.sentinel is None:
        return tokenizer.encode(chat.text, add_special_tokens=False)
    plain = _tokenizer_facts(tokenizer).plain
    ids: list[int] = []
    for position, piece in enumerate(re.split(chat.sentinel, chat.text)):
        if position % 2:  # a sentinel's index
            ids += plain(chat.replaced[int(piece)])
        elif piece:
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return ids


class _Message(Protocol):
    def for_template(self) -> dict[str, Any]: ...


def render_messages(tokenizer, messages: Sequence[_Message],
                    tools: Sequence[dict[str, Any]] | None = None,
                    **options: bool) -> ChatText:
    """``render_chat`` for a request's messages (and tools), shared by the chat and tokenize
    endpoints so both see the same prompt; a template failure is the request's fault (a
    400)."""
    try:
        chat = [m.for_template() for m in messages]
        return render_chat(tokenizer, chat, tools=tools, **options)
    except ValueError as exc:
        raise APIError(400, str(exc), "messages") from exc
    except Exception as exc:
        raise APIError(400, f"cannot apply the chat template: {exc}", "messages") from exc
