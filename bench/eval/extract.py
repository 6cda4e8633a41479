"""Answer extraction as in the KAD paper: last number, last ``\\boxed{}``, last letter."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_LETTER = re.compile(r"\b([A-Z])\b")


def last_number(text: str) -> str | None:
    """The last number in ``text``, thousands separators removed, canonical form."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return normalize_number(matches[-1].replace(",", ""))


def normalize_number(value: str | float | int) -> str | None:
    """``"72.0"``, ``"72"``, ``72`` -> ``"72"``; ``"0.50"`` -> ``"0.5"``."""
    try:
        number = float(str(value).replace(",", "").strip().rstrip("."))
    except ValueError:
        return None
    if number == int(number):
        return str(int(number))
    return repr(number)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces balanced)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{")
    begin = i
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i].strip()
            depth -= 1
        i += 1
    return None


def last_letter(text: str, letters: str = "ABCDEFGHIJ") -> str | None:
    """The last standalone capital letter among the options."""
    found = [m for m in _LETTER.findall(text) if m in letters]
    return found[-1] if found else None


def normalize_boxed(answer: str | None) -> str | None:
    """Compare MATH answers loosely: no spaces, no ``\\left``/``\\right``, ``dfrac``->``frac``."""
    if answer is None:
        return None
    answer = answer.replace(" ", "").replace("\\left", "").replace("\\right", "")
    answer = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")
    number = normalize_number(answer) if re.fullmatch(r"-?[\d,]*\.?\d+", answer) else None
    return number or answer
