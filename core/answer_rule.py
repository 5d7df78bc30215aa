"""The challenge's answer rule (MMAR's official scorer) and its thinking length limit, the one home
shared by inference, data preparation and evaluation. Standard library only: scoring 1,000 items must not import torch.

Lower-case both strings and take the SET of `\\b\\w+\\b` tokens. A prediction is correct when it has
at least one token, holds every token of the answer, and holds no token that belongs only to a
wrong choice. A choice whose token set equals the answer's (e.g. differing only in case or
punctuation) is not a wrong choice.
"""

from __future__ import annotations

import re
from typing import Sequence

# The submission rule beside it: `thinking_prediction` must be UNDER this many characters (the official
# scorer warns and still judges; inference cuts to stay under it, submission checks refuse it).
THINKING_LENGTH_LIMIT = 10_000

_WORD = re.compile(r"\b\w+\b")


def answer_tokens(text: str) -> frozenset[str]:
    """Lower-cased SET of `\\b\\w+\\b` tokens (Unicode-aware, like Python's `re`)."""
    return frozenset(_WORD.findall(text.lower()))


def is_correct(prediction: str, answer: str, choices: Sequence[str]) -> bool:
    """The official answer rule (see the module docstring)."""
    predicted = answer_tokens(prediction)
    if not predicted:
        return False
    expected = answer_tokens(answer)
    wrong_only: set[str] = set()
    for choice in choices:
        tokens = answer_tokens(choice)
        if tokens != expected:
            wrong_only |= tokens - expected
    return expected <= predicted and predicted.isdisjoint(wrong_only)
