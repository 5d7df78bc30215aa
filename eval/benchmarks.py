"""Benchmark adapters: MMAR, MMAU (test-mini; the test set's submission format), MMAU-Pro and MMSU.

Each adapter reads the released metadata in its own schema (fixtures field for field in
tests/data/, sources in tests/data/README.md), turns every item it can score into the project's
item form (an MMAR-schema record that `infer run` answers: id, audio_path, question, choices,
answer) and scores an answer by its benchmark's rule. Where our rule differs from the official
one, docs/eval.md says how. Standard library only, like the rest of scoring.

The answer is read from the submission's `answer_prediction` (what `infer run` parsed after the
last `</think>`); an answer that still holds a thinking block is cut at its last `</think>` first.
A non-answer (a text that names no single choice) is wrong and counted, never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from core.answer_rule import answer_tokens, is_correct
from eval.submission import SubmissionError, _records

THINK_CLOSE = "</think>"  # the split infer/parse.py makes, for answers that still carry their thinking
_LETTER = re.compile(r"^\s*[(\[]?([A-J])[)\].:]?\s*$")
# "The answer is B." / "Answer: B": the lead-in MMSU's official rule reads past (its second-last character)
_LEAD_IN = re.compile(r"^\s*(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*", re.IGNORECASE)
LETTERS = "ABCDEFGHIJ"


def answer_text(prediction: str) -> str:
    """The text after the last `</think>` (the whole text when there is none), stripped."""
    return prediction.rpartition(THINK_CLOSE)[2].strip()


def named_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The one choice an answer names, or None (a non-answer): the choice verbatim; a bare letter
    ("B", "(B)", "B.", "The answer is B.") for the choice at that position; else the one choice the challenge's token
    rule (core.answer_rule) accepts the text for. Two or none: None."""
    text = answer_text(prediction)
    if not text:
        return None
    if text in choices:
        return text
    letter = _LETTER.match(_LEAD_IN.sub("", text, count=1))
    if letter:
        index = LETTERS.index(letter.group(1))
        return choices[index] if index < len(choices) else None
    accepted = [c for c in choices if answer_tokens(c) and is_correct(text, c, choices)]
    return accepted[0] if len(accepted) == 1 else None


@dataclass(frozen=True)
class Scored:
    correct: bool
    answered: bool  # the answer names one choice (a non-answer is wrong and counted)


def score_token_rule(prediction: str, answer: str, choices: Sequence[str]) -> Scored:
    """MMAR's and MMAU's official rule (`string_match` of MMAU's evaluation.py is the same test)."""
    text = answer_text(prediction)
    return Scored(is_correct(text, answer, choices), named_choice(text, choices) is not None)


def score_named_choice(prediction: str, answer: str, choices: Sequence[str]) -> Scored:
    """MMSU and MMAU-Pro: the choice the answer names must be the answer."""
    chosen = named_choice(prediction, choices)
    return Scored(chosen is not None and chosen == answer, chosen is not None)


# ---------------------------------------------------------------- reading each schema


def _label(where: str, rec: dict) -> str:
    return f"{where} (id={rec.get('id')})"


def _need_str(rec: dict, key: str, where: str, allow_empty: bool = False) -> str:
    value = rec.get(key)
    if not isinstance(value, str) or (not value and not allow_empty):
        raise SubmissionError(f"{_label(where, rec)}: {key}: expected a{'' if allow_empty else ' non-empty'} string, "
                              f"got {value!r}")
    return value


def _need_choices(rec: dict, key: str, where: str) -> list[str]:
    value = rec.get(key)
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise SubmissionError(f"{_label(where, rec)}: {key}: expected a list of strings, got {value!r}")
    return value


def _group_value(value: Any) -> Any:
    """A table key: 13 MMAU test-mini records give their category as a one-element list."""
    return ", ".join(map(str, value)) if isinstance(value, list) else value


def _audio(root: Path, path: str) -> str:
    return str((root / path).resolve())


def mmau_item(rec: dict, where: str, root: Path) -> dict | str:
    """MMAU (mmau-test-mini.json / mmau-test.json: a JSON list). The test set withholds its answers
    (answer ""): the item carries its first choice as a stand-in, flagged `answer_withheld`, and is never scored."""
    for key in ("id", "audio_id", "question", "task", "difficulty"):
        _need_str(rec, key, where)
    choices = _need_choices(rec, "choices", where)
    answer = _need_str(rec, "answer", where, allow_empty=True)
    withheld = answer == ""
    # 27 test-mini records repeat a choice verbatim: one choice (the official rule counts equal choices as one)
    choices = list(dict.fromkeys(choices))
    if not withheld and answer not in choices:
        raise SubmissionError(f"{_label(where, rec)}: answer: {answer!r} is not one of its choices {choices!r}")
    return {"id": rec["id"], "audio_path": _audio(root, rec["audio_id"]), "question": rec["question"],
            "choices": choices, "answer": choices[0] if withheld else answer, "answer_withheld": withheld,
            **{k: _group_value(rec.get(k)) for k in ("task", "difficulty", "category", "sub-category", "dataset", "split")}}


def mmsu_item(rec: dict, where: str, root: Path) -> dict | str:
    """MMSU (its released JSONL, the fields its official mmsu_inference.py carries: choice_a..choice_d,
    answer_gt = the correct choice's text)."""
    for key in ("id", "audio_path", "question", "answer_gt", "task_name", "category", "sub-category"):
        _need_str(rec, key, where)
    choices = list(dict.fromkeys(rec[k] for k in ("choice_a", "choice_b", "choice_c", "choice_d") if rec.get(k)))
    if rec["answer_gt"] not in choices:
        raise SubmissionError(f"{_label(where, rec)}: answer_gt: {rec['answer_gt']!r} is not one of choice_a..choice_d")
    return {"id": rec["id"], "audio_path": _audio(root, rec["audio_path"]), "question": rec["question"],
            "choices": choices, "answer": rec["answer_gt"],
            **{k: rec.get(k) for k in ("task_name", "category", "sub-category", "sub-sub-category")}}


# MMAU-Pro categories the official evaluator does not score by choice (evaluate_mmau_pro_comprehensive.py):
# open-ended answers go to an LLM judge, instruction following to format checks.
MMAU_PRO_NOT_CLOSED = {"open": "open-ended (official: LLM judge; not scored here)",
                       "instruction following": "instruction following (official: format rules; not scored here)"}


def mmau_pro_item(rec: dict, where: str, root: Path) -> dict | str:
    """MMAU-Pro (test.parquet's rows as JSONL: audio_path a list, choices a list, category, sub-cat,
    length_type, ...). Only closed-form items with one clip are answered; the rest say why not."""
    _need_str(rec, "id", where)
    _need_str(rec, "question", where)
    category = rec.get("category")
    if category in MMAU_PRO_NOT_CLOSED:
        return MMAU_PRO_NOT_CLOSED[category]
    choices = rec.get("choices") or []
    if len(choices) < 2:  # the official closed-form filter
        return "fewer than 2 choices (official: dropped from closed-form scoring)"
    choices = list(dict.fromkeys(_need_choices(rec, "choices", where)))
    clips = rec.get("audio_path") or []
    clips = [clips] if isinstance(clips, str) else clips
    if len(clips) != 1:
        return "multi-audio (infer gives one clip per prompt; not scored here)" if clips else "no audio"
    answer = _need_str(rec, "answer", where)
    if answer not in choices:  # the official exact comparison can never count it right
        return "answer not among its choices (official: always wrong; not scored here)"
    return {"id": rec["id"], "audio_path": _audio(root, clips[0]), "question": rec["question"], "choices": choices,
            "answer": answer, **{k: rec.get(k) for k in ("category", "sub-cat", "length_type")}}


def mmar_item(rec: dict, where: str, root: Path) -> dict | str:
    """MMAR (MMAR-meta.jsonl), the project's own schema."""
    for key in ("id", "audio_path", "question", "answer"):
        _need_str(rec, key, where)
    choices = _need_choices(rec, "choices", where)
    return {**rec, "audio_path": _audio(root, rec["audio_path"]), "choices": choices}


@dataclass(frozen=True)
class Benchmark:
    name: str
    item: Callable[[dict, str, Path], dict | str]  # record -> item, or why it is not answered
    score: Callable[[str, str, Sequence[str]], Scored]
    groups: tuple[str, ...]  # fields of the per-category tables
    official: str  # the official scorer


BENCHMARKS = {
    "mmar": Benchmark("mmar", mmar_item, score_token_rule, ("modality", "category", "sub-category"),
                      "MMAR code/evaluation_rubrics.py (answer rule)"),
    "mmau": Benchmark("mmau", mmau_item, score_token_rule, ("task", "difficulty", "category", "sub-category"),
                      "MMAU evaluation.py string_match"),
    "mmau-pro": Benchmark("mmau-pro", mmau_pro_item, score_named_choice, ("category", "sub-cat", "length_type"),
                          "MMAU-Pro evaluate_mmau_pro_comprehensive.py (closed-form: NV-Embed-v2 nearest choice)"),
    "mmsu": Benchmark("mmsu", mmsu_item, score_named_choice, ("category", "sub-category", "task_name"),
                      "MMSU mmsu_evaluation.py (first or second-last character as the letter)"),
}


def read_items(kind: str, meta: str | Path, audio_root: str | Path | None = None) -> tuple[list[dict], dict[str, int]]:
    """(the items `infer run` answers, {why not answered: count}) of one benchmark's metadata file.
    Audio paths are resolved against `audio_root` (default: the metadata's folder)."""
    bench = BENCHMARKS[kind]
    meta = Path(meta)
    root = Path(audio_root) if audio_root is not None else meta.parent
    _, records = _records(meta)
    items, skipped, seen = [], {}, {}
    for where, rec in records:
        if not isinstance(rec, dict):
            raise SubmissionError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        item = bench.item(rec, where, root)
        if isinstance(item, str):
            skipped[item] = skipped.get(item, 0) + 1
            continue
        if item["id"] in seen:
            raise SubmissionError(f"{_label(where, rec)}: id: duplicate of {seen[item['id']]}")
        seen[item["id"]] = where
        items.append({**item, "benchmark": kind})
    if not items and not skipped:
        raise SubmissionError(f"{meta}: no records")
    return items, skipped


def chance(items: Sequence[dict]) -> float:
    """Expected accuracy (%) of a uniform guess among each item's choices."""
    return 100.0 * sum(1 / len(it["choices"]) for it in items) / len(items) if items else 0.0


def score_items(kind: str, items: Sequence[dict], predictions: dict[str, str]) -> list[dict]:
    """Per item: id, its group fields, status (correct | wrong | non-answer | missing | withheld) and correct."""
    bench = BENCHMARKS[kind]
    out = []
    for it in items:
        row: dict[str, Any] = {"id": it["id"], **{g: it.get(g) for g in bench.groups}}
        pred = predictions.get(it["id"])
        if it.get("answer_withheld"):
            row.update(status="withheld", correct=None)
        elif pred is None:
            row.update(status="missing", correct=False)
        else:
            s = bench.score(pred, it["answer"], it["choices"])
            row.update(status="correct" if s.correct else "wrong" if s.answered else "non-answer", correct=s.correct)
        out.append(row)
    return out


def summary(rows: Sequence[dict]) -> dict:
    """Accuracy over every scored item (missing and non-answers count wrong) and the counts behind it;
    `accuracy_submitted`: over the submitted items only, as the official scripts divide."""
    scored = [r for r in rows if r["status"] != "withheld"]
    submitted = [r for r in scored if r["status"] != "missing"]
    n, correct = len(scored), sum(bool(r["correct"]) for r in scored)
    return {"n": n, "correct": correct,
            "accuracy": 100.0 * correct / n if n else None,
            "accuracy_submitted": 100.0 * correct / len(submitted) if submitted else None,
            "non_answers": sum(r["status"] == "non-answer" for r in scored),
            "missing": sum(r["status"] == "missing" for r in scored),
            "withheld": len(rows) - n}


def tables(kind: str, rows: Sequence[dict]) -> dict[str, list[dict]]:
    """Per group field of the benchmark: one summary per value (None as "(none)")."""
    out = {}
    for group in BENCHMARKS[kind].groups:
        names = sorted({str(r.get(group) or "(none)") for r in rows})
        out[group] = [{"name": name, **summary([r for r in rows if str(r.get(group) or "(none)") == name])}
                      for name in names]
    return out


def mmau_test_submission(raw_records: Sequence[dict], predictions: dict[str, str]) -> list[dict]:
    """MMAU's prediction file: the benchmark's own records, each with the model's answer under
    `model_prediction` (the key the MMAU README names) and `model_output` (the key its evaluation.py reads)."""
    return [{**rec, "model_prediction": predictions.get(rec["id"], ""), "model_output": predictions.get(rec["id"], "")}
            for rec in raw_records]
