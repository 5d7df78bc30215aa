"""The challenge's judge rules, reproduced from the official scorer (the answer rule, which
inference shares, lives in core/answer_rule.py).

Source: `code/evaluation_rubrics.py` of the public MMAR repository (github.com/ZHYsfl/MMAR, commit
5851ce7). Re-implemented here; only the judge prompt TEXT is reproduced verbatim, because a
single changed character changes what the judge sees. The functions of this module are pure and
import nothing heavy: they are the part of the scorer that must match the challenge exactly.
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

JUDGE_SYSTEM_PROMPT = (
    "You are a impartial and meticulous AI evaluator. Your task is to assess a model's response to a "
    "question by evaluating its reasoning and its final answer. You must strictly follow the provided "
    "ground truth information and the detailed scoring rubric."
)
OFFICIAL_JUDGE_MODEL = "gpt-4o-2024-11-20"

# The official parser: the outermost `[ {...} ]` span, greedy across lines; else the whole reply.
_JSON_LIST = re.compile(r"\[\s*\{.*\}\s*\]", re.DOTALL)


# ---------------------------------------------------------------- judge prompt


def _left_strip_lines(text: str) -> str:
    # The official script strips the whole block, then every line's leading whitespace (lines
    # split by str.splitlines, so \r\n, \x0b, \u2028 ... all become \n). Submitted reasoning
    # goes through the same treatment, so it must be applied to the finished prompt.
    return "\n".join(line.lstrip() for line in text.strip().splitlines())


def _criterion_block(criterion: dict) -> str:
    return "\n".join([
        f"### Criterion: {criterion['name']}",
        f"- Scoring Rule: {criterion['scoring_point']}",
        f"- Score Options: {criterion['choices']}",  # Python's list repr, e.g. "[0, 1]"
        "- Evaluate: Carefully read the model's reasoning and determine if it meets this criterion.",
    ])


def _output_template(criterion: dict, last: bool) -> str:
    return "\n".join([
        "{",
        f"\"name\": \"{criterion['name']}\",",
        f"\"score\": [Assign a score from {criterion['choices']}],",
        "\"justification\": \"Your justification for this score, citing evidence from the model's reasoning. "
        "(less than 50 words)\"",
        "}" if last else "},",
    ])


def judge_user_prompt(
    question: str, answer: str, thinking: str, rubric: Sequence[dict], thinking_prediction: str, answer_prediction: str
) -> str:
    """The judge's user turn, character for character as the official script builds it.

    Shown: question, correct answer, the human reference reasoning, each criterion's name,
    scoring rule and score options, the output format, and the submission. Not shown: the cues
    and each criterion's `note`.
    """
    criteria = "\n".join(_criterion_block(c) for c in rubric)
    output_format = "\n".join(_output_template(c, i == len(rubric) - 1) for i, c in enumerate(rubric))
    prompt = "\n".join([
        "## Ground Truth & Problem Context",
        "",
        f"- Question: {question}",
        f"- Correct Answer: {answer}",
        f"- Ideal Reasoning (for reference): {thinking}",
        "",
        "## Evaluation Rubric & Scoring",
        "",
        "For each point in the rubric, provide a score and a brief justification based on the model's output.",
        "",
        criteria,
        "",
        "## Required Output Format",
        "",
        "Provide your complete evaluation in a single, valid JSON object. Do not add any text before or after "
        "the JSON. The JSON structure must be as follows:",
        "",
        "[",
        output_format,
        "]",
        "",
        "## Model's Submission to Evaluate",
        "",
        "- Model's Reasoning:",
        f"{thinking_prediction} The answer is {answer_prediction}.",
    ])
    return _left_strip_lines(prompt)


# ---------------------------------------------------------------- judge replies


class ReplyError(ValueError):
    """A judge reply that does not parse under the official rules; it is asked again."""


def reply_entries(reply: str | None) -> list:
    """The reply's JSON list as the official parser finds it (the regex's span, else the whole reply)."""
    if reply is None:
        raise ReplyError("empty reply")
    match = _JSON_LIST.search(reply)
    try:
        parsed: Any = json.loads(match.group(0) if match else reply)
    except json.JSONDecodeError as err:
        raise ReplyError(f"invalid JSON: {err}") from None
    if not isinstance(parsed, list):
        raise ReplyError("not a JSON list")
    return parsed


def parse_judge_reply(reply: str, rubric: Sequence[dict]) -> float:
    """One rating in [0, 1]: sum of scores / sum of maximum scores, or `ReplyError`.

    Official rules: take the regex's JSON-list span (else the whole reply), parse it as JSON;
    it must be a list as long as the rubric, every entry an object with `name` and `score`, the
    score a number among the criterion's `choices`. A name that differs is accepted (the
    official script only logs it).
    """
    parsed = reply_entries(reply)
    if len(parsed) != len(rubric):
        raise ReplyError(f"rubric length mismatch: expected {len(rubric)} entries, got {len(parsed)}")
    got = best = 0.0
    for i, (entry, criterion) in enumerate(zip(parsed, rubric)):
        if not isinstance(entry, dict) or "name" not in entry or "score" not in entry:
            raise ReplyError(f"entry {i} must be an object with 'name' and 'score'")
        score, allowed = entry["score"], criterion["choices"]
        # bool is an int subclass in Python; the official isinstance check accepts it too.
        if not isinstance(score, (int, float)):
            raise ReplyError(f"entry {i} ({criterion['name']!r}): score must be numeric, got {type(score).__name__}")
        if score not in allowed:
            raise ReplyError(f"entry {i} ({criterion['name']!r}): score {score!r} not in allowed choices {allowed}")
        got += score
        best += max(allowed)
    return 0.0 if best == 0 else got / best


def trimmed_mean(ratings: Sequence[float]) -> float:
    """Mean of the ratings without the lowest and the highest (all of them when fewer than 3)."""
    if not ratings:
        raise ValueError("no ratings")
    ordered = sorted(ratings)
    kept = ordered[1:-1] if len(ordered) >= 3 else ordered
    return sum(kept) / len(kept)
