"""The one validation of a benchmark/training record's core fields, shared by inference and training
(`core.items`) and scoring (`eval.submission`, which must not import torch: stdlib only)."""

from __future__ import annotations

REQUIRED_FIELDS = ("id", "audio_path", "question", "choices", "answer")


def record_problem(obj: dict, fields: tuple[str, ...] = REQUIRED_FIELDS) -> str | None:
    """`field: what is wrong` for the first problem of a record, or None when `fields` are all valid."""
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
