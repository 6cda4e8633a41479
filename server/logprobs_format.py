"""Logprobs in OpenAI's response shapes (chat ``logprobs.content``, completions' legacy
``tokens``/``token_logprobs``/``top_logprobs``/``text_offset``), as vLLM's server writes them.

Values are log pi (see docs/api.md); a token's text is ``tokenizer.decode([id])``, as vLLM
does, so a client can compare a token with its alternatives by string. JSON has no -inf:
values are clamped at -9999.0, vLLM's floor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from server.engine.interface import TokenLogprob

LOGPROB_FLOOR = -9999.0

TokenText = Callable[[int], str]


def _value(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def _chat_entry(token_id: int, logprob: float, token_text: TokenText) -> dict[str, Any]:
    text = token_text(token_id)
    return {"token": text, "logprob": _value(logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText,
                  top_logprobs: int) -> dict[str, Any]:
    """``choices[i].logprobs`` of a chat completion (or of one streamed delta)."""
    return {"content": [
        _chat_entry(e.token_id, e.logprob, token_text) | {"top_logprobs": [
            _chat_entry(tid, lp, token_text) for tid, lp in e.top[:top_logprobs]
        ]}
        for e in entries
    ]}


def completion_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText,
                        start_offset: int) -> tuple[dict[str, Any], int]:
    """``choices[i].logprobs`` of a text completion and the text offset after it.

    An entry whose logprob is None (the first prompt token under ``echo``: nothing precedes
    it) has null values, as OpenAI's. ``top_logprobs[t]`` holds the token itself and its top
    alternatives (vLLM's shape), so whether the token was the argmax is decidable from it.
    """
    tokens, values, tops, offsets = [], [], [], []
    offset = start_offset
    for entry in entries:
        text = token_text(entry.token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if entry.logprob is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(_value(entry.logprob))
        top = {text: _value(entry.logprob)}
        for tid, lp in entry.top:
            top.setdefault(token_text(tid), _value(lp))
        tops.append(top)
    return ({"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
             "text_offset": offsets}, offset)
