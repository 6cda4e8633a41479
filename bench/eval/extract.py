"""Answer extraction as in the KAD paper: last number, last ``\\boxed{}``, last letter.

The paper (Appendix I) extracts with regular expressions: the last number of the response
for GSM8K/SVAMP, the last ``\\boxed{}`` for MATH500 and the option letter for multiple
choice. Gold answers go through the same normalisation, so comparison is exact match on
canonical strings (numbers compared as numbers).
"""

from __future__ import annotations

import math
import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_LETTER = re.compile(r"\b([A-Z])\b")
_BOX_OPENERS = ("\\boxed{", "\\fbox{")


def last_number(text: str) -> str | None:
    """The last number in ``text``, thousands separators removed, canonical form."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return normalize_number(matches[-1].replace(",", ""))


def normalize_number(value: str | float) -> str | None:
    """``"72.0"``, ``"72"``, ``72``, ``"1,200"`` -> ``"72"``/``"1200"``; ``"0.50"`` -> ``"0.5"``."""
    try:
        number = float(str(value).replace(",", "").replace("$", "").strip().rstrip("."))
    except ValueError:
        return None
    if not math.isfinite(number):
        return None
    if number == int(number):
        return str(int(number))
    return repr(number)


def _balanced(text: str, begin: int) -> int | None:
    """Index of the ``}`` closing the group that starts at ``begin`` (None: unclosed)."""
    depth = 0
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return i
            depth -= 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced.

    A box cut off by ``max_tokens`` is skipped in favour of the previous complete one.
    """
    starts = sorted(
        (m.end() for opener in _BOX_OPENERS for m in re.finditer(re.escape(opener), text)),
        reverse=True,
    )
    for begin in starts:
        end = _balanced(text, begin)
        if end is not None:
            return text[begin:end].strip()
    return None


def last_letter(text: str, letters: str = "ABCDEFGHIJ") -> str | None:
    """The last standalone capital letter that names one of the options."""
    found = [m for m in _LETTER.findall(text) if m in letters]
    return found[-1] if found else None


def _strip_text_wrappers(answer: str) -> str:
    """``\\text{(C)}`` -> ``(C)``; ``\\mbox{cm}`` -> ``cm`` (units are removed afterwards)."""
    return re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", answer)


def _fix_fracs(answer: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{2}`` -> ``\\frac{1}{2}`` (MATH convention)."""
    return re.sub(r"\\frac(?:(\d)|(\{[^{}]*\}))(?:(\d)|(\{[^{}]*\}))",
                  lambda m: "\\frac" + (m[2] or "{" + m[1] + "}") + (m[4] or "{" + m[3] + "}"),
                  answer)


def normalize_boxed(answer: str | None) -> str | None:
    """Canonical MATH answer, after Hendrycks et al.'s ``strip_string`` (the standard check).

    Removes spaces, ``\\left``/``\\right``, ``\\!``, dollars, degrees, percent, text wrappers
    and a leading ``x =``; ``dfrac``/``tfrac`` -> ``frac``; ``a/b`` -> ``\\frac{a}{b}``;
    ``0.5`` and ``.5`` -> ``0.5``; numbers canonical (``12.0`` -> ``12``, ``1,000`` -> ``1000``).
    """
    if answer is None:
        return None
    answer = answer.replace("\n", "").replace("\\!", "").replace("\\,", "").replace("\\;", "")
    answer = answer.replace("\\left", "").replace("\\right", "")
    answer = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    answer = answer.replace("^{\\circ}", "").replace("^\\circ", "")
    answer = answer.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    answer = _strip_text_wrappers(answer)
    answer = answer.replace(" ", "").rstrip(".")
    if re.fullmatch(r"[a-zA-Z]\w*=.+", answer) and len(answer.split("=")[0]) <= 2:
        answer = answer.split("=", 1)[1]  # "x=5" -> "5"
    answer = _fix_fracs(answer)
    simple = re.fullmatch(r"(-?\d+)/(\d+)", answer)
    if simple:
        answer = f"\\frac{{{simple[1]}}}{{{simple[2]}}}"
    if re.fullmatch(r"-?[\d,]*\.?\d+", answer):
        return normalize_number(answer)
    return answer


def answers_match(kind: str, extracted: str | None, gold: str | None) -> bool:
    """Exact match on canonical answers; numbers equal up to float rounding."""
    if extracted is None or gold is None:
        return False
    if extracted == gold:
        return True
    if kind in ("number", "boxed"):
        try:
            return math.isclose(float(extracted), float(gold), rel_tol=1e-9, abs_tol=1e-9)
        except ValueError:
            return False
    return False
