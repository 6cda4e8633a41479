"""Incremental detokenization with stop strings, for one request's output tokens.

The engine detokenizes itself (instead of vLLM) because vLLM's output for a request starts
with the withheld last prompt token (see ``verification_hook``), which is not output text.
Deltas are decoded over a short window (prefix offset / read offset), so a token that ends
mid UTF-8 character waits for the next one, and the concatenated deltas equal the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class IncrementalDetokenizer:
    """Feed token ids; get text deltas; stops at the first stop string (excluded)."""

    tokenizer: Any
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    stopped: bool = False
    _prefix_offset: int = 0
    _read_offset: int = 0
    _pending: str = ""  # text held back because it may be the start of a stop string

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, new_ids: list[int]) -> str:
        """Append tokens; return the text that is now final (may be empty)."""
        if self.stopped:
            return ""
        decoded = ""
        for token_id in new_ids:
            self.token_ids.append(token_id)
            prefix = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
            full = self._decode(self.token_ids[self._prefix_offset:])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                decoded += full[len(prefix):]
                self._prefix_offset = self._read_offset
                self._read_offset = len(self.token_ids)
        return self._apply_stop(decoded)

    def _apply_stop(self, decoded: str) -> str:
        candidate = self._pending + decoded
        for stop in self.stop:
            index = candidate.find(stop)
            if index >= 0:
                self.stopped = True
                self._pending = ""
                self.text += candidate[:index]
                return candidate[:index]
        # Hold back the longest tail that is a prefix of some stop string.
        hold = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(candidate)), 0, -1):
                if stop.startswith(candidate[-length:]):
                    hold = max(hold, length)
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
        prefix = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        full = self._decode(self.token_ids[self._prefix_offset:])
        tail = full[len(prefix):] if full.startswith(prefix) else ""
        self._prefix_offset = self._read_offset = len(self.token_ids)
        rest = self._pending + tail
        self._pending = ""
        for stop in self.stop:  # the tail may complete a stop string
            index = rest.find(stop)
            if index >= 0:
                self.stopped = True
                rest = rest[:index]
                break
        self.text += rest
        return rest
