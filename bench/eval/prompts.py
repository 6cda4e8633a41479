"""The prompts of the KAD paper's evaluation (Appendix I)."""

from __future__ import annotations

from bench.eval.datasets import LETTERS, Item

MC_PREFIX = "Choose the correct answer to the following multiple-choice question.\n\n"
MC_SUFFIX = ("\nProvide your reasoning about the answer and finish your answer with the letter "
             "corresponding to the correct option (e.g., A, B, C, or D).\n\n")
MATH_SUFFIX = ("\nSolve the problem step by step and finish your answer with the final number.")
BOXED_SUFFIX = "\nSolve the problem step by step and put the final answer in \\boxed{}."


def messages(item: Item) -> list[dict[str, str]]:
    if item.kind == "choice":
        options = "".join(f"\n{LETTERS[i]}). {text}" for i, text in enumerate(item.choices))
        content = f"{MC_PREFIX}{item.question}\n{options}\n{MC_SUFFIX}"
    elif item.kind == "boxed":
        content = item.question + BOXED_SUFFIX
    else:
        content = item.question + MATH_SUFFIX
    return [{"role": "user", "content": content}]
