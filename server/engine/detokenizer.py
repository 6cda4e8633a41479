"""Incremental detokenization with stop strings, for one request's output tokens.

The engine detokenizes itself (instead of vLLM) so that a stop string ends the request
where the text ends, whatever tokens the hook emitted in one step. Decoding is the ``tokenizers`` library's ``DecodeStream`` (what vLLM's own fast
detokenizer uses): a token that ends mid UTF-8 character yields nothing until the
character is complete, and the concatenated deltas equal the decoded text. What is left
here is the stop-string handling: text that may be the start of a stop string is held
back until it is known not to be one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# tokenizers' error when a tokenizer decodes non-monotonically (vLLM issue 17448).
_INVALID_PREFIX = "Invalid prefix encountered"


def backend_tokenizer(tokenizer: Any) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` behind a Hugging Face (fast) tokenizer."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise TypeError(
            f"{type(tokenizer).__name__} is not backed by the tokenizers library (a fast "
            "tokenizer, tokenizer.json); kad-serve's incremental detokenizer needs one"
        )
    return backend


def first_stop(text: str, stop: tuple[str, ...]) -> tuple[int, int] | None:
    """(start, end) of the stop string that completes earliest in ``text`` (ties: the
    earlier in ``stop``), so several tokens at once stop where one at a time would."""
    best: tuple[int, int] | None = None
    for string in stop:
        index = text.find(string)
        if index >= 0 and (best is None or index + len(string) < best[1]):
            best = (index, index + len(string))
    return best


@dataclass
class IncrementalDetokenizer:
    """Feed token ids; get text deltas; stops at the first stop string (excluded)."""

    tokenizer: Any
    stop: tuple[str, ...] = ()
    # The text of the first ``min_tokens`` tokens is never searched for a stop string
    # (vLLM's meaning of min_tokens: no stop before then).
    min_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    stopped: bool = False
    _backend: Tokenizer = field(init=False, repr=False)
    _stream: DecodeStream = field(init=False, repr=False)
    _undecoded: list[int] = field(default_factory=list)  # ids the stream has not yet shown
    _pending: str = ""  # text held back because it may be the start of a stop string

    def __post_init__(self) -> None:
        self._backend = backend_tokenizer(self.tokenizer)
        self._stream = DecodeStream(skip_special_tokens=True)

    def _step(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self._backend, token_id)
        except Exception as error:
            if not str(error).startswith(_INVALID_PREFIX):
                raise
            # The stream's state is broken; vLLM's detokenizer restarts it the same way.
            self._stream = DecodeStream(skip_special_tokens=True)
            return self._stream.step(self._backend, token_id)

    def add(self, new_ids: list[int]) -> str:
        """Append tokens; return the text that is now final (may be empty)."""
        if self.stopped:
            return ""
        decoded = ""
        released = ""  # text before min_tokens is reached: out at once, never a stop
        for token_id in new_ids:
            self.token_ids.append(token_id)
            piece = self._step(token_id)
            if piece is None:
                self._undecoded.append(token_id)
            else:
                self._undecoded.clear()
                decoded += piece
            if len(self.token_ids) <= self.min_tokens:
                released += self._pending + decoded
                self._pending, decoded = "", ""
        self.text += released
        return released + self._apply_stop(decoded)

    def _apply_stop(self, decoded: str) -> str:
        candidate = self._pending + decoded
        found = first_stop(candidate, self.stop)
        if found is not None:
            self.stopped = True
            self._pending = ""
            self.text += candidate[:found[0]]
            return candidate[:found[0]]
        # Hold back the longest tail that is a prefix of some stop string.
        hold = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(candidate)), hold, -1):
                if stop.startswith(candidate[-length:]):
                    hold = length
                    break
        ready = candidate[: len(candidate) - hold]
        self._pending = candidate[len(candidate) - hold:]
        self.text += ready
        return ready

    def flush(self) -> str:
        """At the end of generation: release held-back text (no stop string completed),
        including a trailing incomplete UTF-8 sequence, decoded as replacement characters."""
        if self.stopped:
            return ""
        tail = (self._backend.decode(self._undecoded, skip_special_tokens=True)
                if self._undecoded else "")
        self._undecoded.clear()
        rest = self._pending + tail
        self._pending = ""
        found = first_stop(rest, self.stop)  # the tail may complete a stop string
        if found is not None:
            self.stopped = True
            rest = rest[:found[0]]
        self.text += rest
        return rest
