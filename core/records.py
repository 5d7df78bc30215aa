"""The one validation of a benchmark/training record's core fields, shared by inference and training
(`core.items`) and scoring (`eval.submission`, which must not import torch: stdlib only)."""

from __future__ import annotations

import re
from typing import Any

REQUIRED_FIELDS = ("id", "audio_path", "question", "choices", "answer")
# JSON's \ud800-\udfff escapes without their pair decode to lone surrogates: text no UTF-8 file can hold,
# which the tokenizer and every writer of the record would fail on.
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(value: Any, name: str = "") -> str | None:
    """`field: what is wrong` for the first string in a JSON value (keys included) holding a lone surrogate,
    or None. `name` is the value's own field name; nested ones read `rubric[0].name`."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        return None if found is None else (
            f"{name or 'value'}: holds a lone surrogate (U+{ord(found.group()):04X}) at character {found.start() + 1}, "
            "not valid Unicode (a \\uXXXX escape without its pair): no UTF-8 file can hold it; fix the text")
    pairs = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, sub in pairs:
        label = f"{name}[{key}]" if isinstance(key, int) else f"{name}.{key}" if name else key
        problem = lone_surrogate(key, f"{label} (the key)") if isinstance(key, str) else None
        if problem is not None or (problem := lone_surrogate(sub, label)) is not None:
            return problem
    return None


def shown_id(rid: Any) -> str:
    """An id for a message: as it is, or escaped when it holds a lone surrogate (the message could not be printed)."""
    return ascii(rid) if isinstance(rid, str) and _SURROGATE.search(rid) else str(rid)


def record_problem(obj: dict, fields: tuple[str, ...] = REQUIRED_FIELDS) -> str | None:
    """`field: what is wrong` for the first problem of a record, or None when `fields` are all valid and
    no string of the record holds a lone surrogate."""
    if (problem := lone_surrogate(obj)) is not None:
        return problem
    for name in fields:
        if name not in obj or obj[name] in (None, ""):
            return f"{name}: missing"
    for name in fields:
        if name != "choices" and not isinstance(obj[name], str):
            return f"{name}: expected a string, got {type(obj[name]).__name__}"
    choices = obj["choices"]
    # Strings, not necessarily non-empty: one real MMAR record carries an empty fifth choice.
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        return f"choices: expected a list of at least 2 strings, got {choices!r}"
    if len(set(choices)) != len(choices):
        return f"choices: duplicate choice in {choices!r}"
    if obj["answer"] not in choices:
        return f"answer: {obj['answer']!r} is not one of its choices {choices!r}"
    return None
