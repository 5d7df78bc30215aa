"""From a raw model output to the submission's thinking and answer, by string matching only.

The challenge allows no second model to separate or extract the answer, so everything here is
plain string processing, shared by inference and by data_prep's verification.

Policies (recorded in every run's JSON, see `POLICY`):
- Split at the LAST `</think>`: the thinking is what comes before it, the answer what comes after.
  Every `<think>`/`</think>` tag is removed from both parts.
- Truncated output (no `</think>`: the budget ran out mid-thought): the whole text is the thinking.
  When the official rule accepts the whole text for a choice, that choice is the answer; else the
  answer is searched for only in the last paragraph of the thought, with the containment rules (a
  thought that stopped mid-way names several choices, so looser rules would guess). The rule name
  is prefixed `truncated:`. Nothing found: the answer is empty.
- The answer text is mapped to exactly one choice, verbatim, by the first rule of `RULES` that
  gives exactly one choice. When none does, the answer is the stripped answer text as written
  (rule `unmatched`, or `empty`).
- Never worse than the text as written: when the official rule scores the answer text right for
  a choice, a rule that picks another choice is skipped (tests/test_parse_property.py checks this
  on every MMAR item under many output templates).
- The thinking is kept under 10,000 characters without adding a character: a longer one (the
  thinking budget at generation time keeps that rare) is cut after its last sentence end under
  the limit (else its last space, else at the limit), and `thinking_cut` records it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from core.answer_rule import THINKING_LENGTH_LIMIT, answer_tokens, is_correct
from core.qwen_omni import THINK_CLOSE, THINK_OPEN

# A sentence end: terminal punctuation (and closing quotes or brackets) before a space or the end.
_SENTENCE_END = re.compile(r"[.!?。！？…]+[\"'”’)\]]*(?=\s|$)")

# Tried in this order; the first that maps the answer text to exactly one choice wins.
RULES = (
    "exact",  # the answer text is a choice, verbatim
    "normalized",  # equal after dropping case, markdown, lead-ins ("Answer:"), punctuation, spacing
    "letter",  # "B", "(B)", "B.", "Option B", or "B. <that choice>": the choice at that position
    "contains_choice",  # exactly one choice appears as whole words in the answer (longest wins nested)
    "within_choice",  # the answer appears as whole words in exactly one choice ("piano" -> "A piano")
    "tokens",  # the official scorer's test: all of one choice's words, no word only of another choice
)
POLICY = {
    "split": "last </think>; all <think>/</think> tags removed",
    "rules": list(RULES),
    "unmatched": "answer_prediction = stripped answer text as written",
    "truncated": "thinking = whole output; answer from the last paragraph by containment rules, else empty",
    "thinking_limit": f"< {THINKING_LENGTH_LIMIT} chars: cut after the last sentence end under it; nothing inserted",
}

LETTERS = "ABCDEFGHIJ"
_TAGS = re.compile(re.escape(THINK_OPEN) + "|" + re.escape(THINK_CLOSE))
# Markdown marks: headings and quotes at a line's start, emphasis and code marks at a word's edge
# (a "#" or "_" inside a word is text: "F#m11", "snake_case").
_MARKDOWN = re.compile(r"^\s*(?:#+|>+)\s*|(?<!\w)[*_`]+|[*_`]+(?!\w)", re.MULTILINE)
# Lead-ins a model writes before its answer; removed repeatedly from the start.
_LEAD_IN = re.compile(
    r"^\s*(?:(?:so|thus|therefore|hence)\s*,?\s*)?(?:(?:the|my)\s+)?(?:final\s+|correct\s+|best\s+)?"
    r"(?:answer|choice|option)\s*(?:is|:|-)\s*",
    re.IGNORECASE,
)
_LETTER = re.compile(r"^\s*(?:(?:option|choice|answer)\s*)?[(\[]?([A-J])[)\].:]?\s*$", re.IGNORECASE)
_LETTER_LABEL = re.compile(r"^\s*(?:(?:option|choice)\s*)?[(\[]?([A-J])[)\].:]\s+(.+)$", re.IGNORECASE | re.DOTALL)
_WORDS = re.compile(r"\w+")


@dataclass(frozen=True)
class Parsed:
    thinking: str  # tags removed, cut under THINKING_LENGTH_LIMIT
    answer: str  # the matched choice verbatim, else the stripped answer text
    answer_text: str  # what the model wrote as its answer (after the last </think>), stripped
    rule: str  # the rule of RULES that fired (prefixed "truncated:" for truncated outputs), "unmatched" or "empty"
    truncated: bool  # no </think> in the output
    thinking_cut: bool  # the thinking was cut to stay under THINKING_LENGTH_LIMIT

    @property
    def matched(self) -> bool:
        return self.rule not in ("unmatched", "empty")


def strip_tags(text: str) -> str:
    return _TAGS.sub("", text).strip()


def split_output(text: str) -> tuple[str, str, bool]:
    """(thinking, answer text, truncated): split at the last </think>, tags removed."""
    head, sep, tail = text.rpartition(THINK_CLOSE)
    if not sep:
        return strip_tags(text), "", True
    return strip_tags(head), strip_tags(tail), False


def cut_thinking(thinking: str, limit: int = THINKING_LENGTH_LIMIT) -> tuple[str, bool]:
    """(the thinking, whether it was cut): a prefix strictly shorter than `limit`, ending after the last
    sentence end that fits, else the last space, else at the limit. No character is added."""
    if len(thinking) < limit:
        return thinking, False
    ends = [m.end() for m in _SENTENCE_END.finditer(thinking, 0, limit) if m.end() < limit]
    if not ends:
        space = thinking.rfind(" ", 0, limit)
        ends = [space if space > 0 else limit - 1]
    return thinking[:ends[-1]].rstrip(), True


def _clean(text: str) -> str:
    """Drop markdown, lead-ins ("**Answer:** ...") and surrounding quotes/punctuation."""
    text = _MARKDOWN.sub("", text).strip()
    while True:
        stripped = _LEAD_IN.sub("", text, count=1)
        if stripped == text:
            break
        text = stripped
    return text.strip().strip("\"'“”‘’").strip().rstrip(".!").strip()


def _words(text: str) -> list[str]:
    return _WORDS.findall(text.casefold())


def _norm(text: str) -> str:
    return " ".join(_words(text))


def _contains_words(haystack: str, needle: str) -> bool:
    """`needle` occurs in `haystack` as whole words (both already normalised)."""
    return bool(needle) and f" {needle} " in f" {haystack} "


def _one(indices: list[int], choices: Sequence[str]) -> str | None:
    return choices[indices[0]] if len(indices) == 1 else None


def _letter(text: str, choices: Sequence[str]) -> str | None:
    match = _LETTER.match(text)
    if match:
        index = LETTERS.index(match.group(1).upper())
        return choices[index] if index < len(choices) else None
    match = _LETTER_LABEL.match(text)
    if match:
        index = LETTERS.index(match.group(1).upper())
        # "B. <text>" counts here only when <text> is that choice. With another choice's text the text
        # wins (through the later rules): the prompt lists the choices without letters, so a letter
        # is the model's own numbering and the text is what it names.
        if index < len(choices) and _norm(match.group(2)) == _norm(choices[index]):
            return choices[index]
    return None


def _contains_choice(text: str, choices: Sequence[str]) -> str | None:
    norm = _norm(text)
    found = [i for i, c in enumerate(choices) if _contains_words(norm, _norm(c))]
    # A choice nested in a longer found one ("tone" in "the second tone") is not a rival.
    found = [i for i in found if not any(j != i and _contains_words(_norm(choices[j]), _norm(choices[i])) and
                                         _norm(choices[j]) != _norm(choices[i]) for j in found)]
    return _one(found, choices)


def _within_choice(text: str, choices: Sequence[str]) -> str | None:
    norm = _norm(text)
    return _one([i for i, c in enumerate(choices) if _contains_words(_norm(c), norm)], choices)


def _tokens(text: str, choices: Sequence[str]) -> str | None:
    # The choice the official scorer would accept for this text; a choice without words never counts.
    return _one([i for i, c in enumerate(choices) if answer_tokens(c) and is_correct(text, c, choices)], choices)


def official_choices(text: str, choices: Sequence[str]) -> list[int]:
    """Indices of the choices the official scorer accepts `text` for (choices with the same words count
    as one: the rule accepts a text for at most one such group)."""
    return [i for i, c in enumerate(choices) if answer_tokens(c) and is_correct(text, c, choices)]


def match_choice(answer_text: str, choices: Sequence[str], rules: Sequence[str] = RULES) -> tuple[str | None, str]:
    """(the one choice the answer names, the rule that found it), or (None, "unmatched"/"empty").

    A rule's pick that the official scorer would score wrong while it scores the text as written
    right is refused: parsing never turns an answer the challenge counts correct into a wrong one.
    """
    raw = answer_text.strip()
    cleaned = _clean(raw)
    if not cleaned:
        return None, "empty"
    accepted = official_choices(raw, choices)
    for rule in rules:
        if rule == "exact":
            hit = raw if raw in choices else None
        elif rule == "normalized":
            hit = _one([i for i, c in enumerate(choices) if _norm(c) and _norm(c) == _norm(cleaned)], choices)
        elif rule == "letter":
            hit = _letter(cleaned, choices)
        elif rule == "contains_choice":
            hit = _contains_choice(cleaned, choices)
        elif rule == "within_choice":
            hit = _within_choice(cleaned, choices)
        elif rule == "tokens":
            hit = choices[accepted[0]] if accepted else _tokens(cleaned, choices)
        else:
            raise ValueError(f"unknown answer rule {rule!r}; known: {RULES}")
        if hit is not None and (not accepted or choices.index(hit) in accepted):
            return hit, rule
    return None, "unmatched"


def last_paragraph(text: str) -> str:
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    return paragraphs[-1] if paragraphs else ""


def parse_output(text: str, choices: Sequence[str]) -> Parsed:
    """Thinking and answer of one raw output, under the policies of this module's docstring."""
    thinking, answer_text, truncated = split_output(text)
    if truncated:
        # Without </think> the whole output is what a plain split would submit: when the official
        # rule accepts it for a choice, that choice is the answer.
        accepted = official_choices(thinking, choices)
        hit, rule = (choices[accepted[0]], "tokens") if accepted else match_choice(
            last_paragraph(thinking), choices, rules=("contains_choice", "tokens"))
        answer, rule = (hit, f"truncated:{rule}") if hit is not None else ("", "empty")
    else:
        hit, rule = match_choice(answer_text, choices)
        answer = hit if hit is not None else answer_text
    kept, was_cut = cut_thinking(thinking)
    return Parsed(kept, answer, answer_text, rule, truncated, was_cut)
