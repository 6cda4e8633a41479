"""Answer extraction as in the KAD paper, on hand-written outputs of each format."""

from __future__ import annotations

import pytest

from bench.eval.datasets import Item
from bench.eval.extract import (
    answers_match,
    last_boxed,
    last_letter,
    last_number,
    normalize_boxed,
    normalize_number,
)
from bench.eval.runner import extract


@pytest.mark.parametrize(("text", "expected"), [
    ("She makes 9 * 2 = $18 every day.\nThe answer is 18.", "18"),
    ("The total is 1,234 dollars.", "1234"),
    ("first 12, then 18, finally 2,500,000", "2500000"),
    ("1,200 apples, then 3 more: 1,203", "1203"),
    ("The temperature drops to -7 degrees.", "-7"),
    ("He owes -1,250.50 now", "-1250.5"),
    ("costs $3.50 each, total 10.0", "10"),
    ("0.25 then 0.5", "0.5"),
    ("answer: .75", "0.75"),
    ("So the answer is 42.", "42"),  # sentence full stop is not a decimal point
    ("The ratio is 5, 6, or 7, so 7,", "7"),  # list commas are not thousands separators
    ("no digits here", None),
])
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_number_normalisation_matches_gold_formats():
    # SVAMP gold is a float, GSM8K gold a string after '####' that may carry commas.
    assert normalize_number(51.0) == "51" == normalize_number("51")
    assert normalize_number(" 1,200 ") == "1200"
    assert normalize_number("0.50") == "0.5"
    assert normalize_number("abc") is None and normalize_number("nan") is None


@pytest.mark.parametrize(("text", "expected"), [
    (r"a \boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{ {a}_{b} }", "{a}_{b}"),
    (r"so \boxed{\sqrt{2^{3}}+\left(\frac{1}{2}\right)}.", r"\sqrt{2^{3}}+\left(\frac{1}{2}\right)"),
    (r"\boxed{3} and finally \boxed{4", "3"),  # a box cut by max_tokens: previous one
    (r"\fbox{7}", "7"),
    ("none", None),
    (r"\boxed{open", None),
])
def test_last_boxed_with_nested_braces(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(("answer", "canonical"), [
    (r"\dfrac{3}{4}", r"\frac{3}{4}"),
    (r"\frac34", r"\frac{3}{4}"),
    ("3/4", r"\frac{3}{4}"),
    ("12.0", "12"),
    ("1,000", "1000"),
    (r"90^\circ", "90"),
    (r"50\%", "50"),
    (r"\$5", "5"),
    ("x = 5", "5"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    (r"\text{(C)}", "(C)"),
])
def test_math_answer_normalisation(answer, canonical):
    assert normalize_boxed(answer) == canonical


def test_last_letter_among_options():
    assert last_letter("A is wrong, B maybe, so the answer is C.") == "C"
    assert last_letter("I think (D). Actually B") == "B"
    assert last_letter("Between A and B I pick A. Answer: B)") == "B"
    # Capital letters inside words, and letters outside the options, do not count.
    assert last_letter("Answer: CAB", "ABCD") is None
    assert last_letter("Answer: E", "ABCD") is None
    assert last_letter("So it is B. I am sure.", "ABCD") == "B"
    assert last_letter("A", "ABCD") == "A" and last_letter("none", "ABCD") is None


def test_extraction_and_matching_per_item_kind():
    number = Item("n", "q", "1200", "number")
    boxed = Item("m", "q", r"\frac{1}{2}", "boxed")
    choice = Item("c", "q", "B", "choice", ("x", "y", "z"))
    assert extract(number, "It costs 1,200.") == "1200"
    assert extract(boxed, r"so \boxed{\dfrac{1}{2}}") == r"\frac{1}{2}"
    assert extract(boxed, r"\boxed{0.5}") == "0.5"
    assert extract(choice, "Not A, not D (no such option): B") == "B"
    assert answers_match("number", "1200.0000000001", "1200")
    assert not answers_match("number", "1201", "1200")
    assert not answers_match("number", None, "1200")
    assert answers_match("boxed", r"\frac{1}{2}", r"\frac{1}{2}")
    assert not answers_match("boxed", "0.5", r"\frac{1}{2}")  # exact match, as the paper
    assert answers_match("choice", "B", "B") and not answers_match("choice", "b", "B")
