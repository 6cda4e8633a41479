"""Incremental detokenization: deltas add up to the full text; stop strings; partial UTF-8."""

from __future__ import annotations

import pytest

from server.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_pair):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_pair.draft)


def test_deltas_concatenate_to_the_decoded_text(tokenizer):
    text = "Answer: 1,000 + 2,500 = 3,500 — héllo wörld ✓"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add([token]) for token in ids] + [detok.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text == detok.text


def test_incomplete_utf8_is_held_then_flushed(tokenizer):
    ids = tokenizer.encode("✓", add_special_tokens=False)
    assert len(ids) > 1  # a multi-byte character split over byte-level tokens
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.add(ids[:1]) == ""
    assert detok.flush() == tokenizer.decode(ids[:1])  # replacement char at the very end


def test_stop_string_across_tokens_is_cut_and_excluded(tokenizer):
    ids = tokenizer.encode("The answer is 72. Question: next", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=("Question:",))
    out = ""
    for token in ids:
        out += detok.add([token])
        if detok.stopped:
            break
    assert detok.stopped and out == "The answer is 72. " == detok.text


def test_text_that_only_looks_like_a_stop_prefix_is_released(tokenizer):
    ids = tokenizer.encode("a Que b", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=("Question",))
    out = "".join(detok.add([token]) for token in ids) + detok.flush()
    assert out == "a Que b" and not detok.stopped


def test_several_tokens_at_once_stop_where_one_at_a_time_would(tokenizer):
    ids = tokenizer.encode("x a b c d", add_special_tokens=False)
    # "b c" is listed first but "a" completes earlier in the text.
    detok = IncrementalDetokenizer(tokenizer, stop=("b c", "a"))
    assert detok.add(ids) == "x " and detok.stopped and detok.text == "x "
    assert detok.add(ids) == "" and detok.flush() == ""


def test_stop_string_completed_by_the_flushed_tail(tokenizer):
    ids = tokenizer.encode("ok ✓", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=("\ufffd",))
    out = detok.add(ids[:-1]) + detok.flush()
    assert out == "ok " and detok.stopped


def test_a_tokenizer_without_a_tokenizers_backend_is_refused():
    class Slow:
        def decode(self, ids, skip_special_tokens=False):
            return ""

    with pytest.raises(TypeError, match="fast"):
        IncrementalDetokenizer(Slow())
