"""Reading benchmark metadata and submissions, and converting the older submission format.

Scoring must stay light (seconds for 1,000 items), so this module reads JSONL itself instead of
going through `core.items`, which pulls in torch via the audio decoder. Errors name the file,
the line, the id and the field.

A submission is JSONL or a JSON list (the official scorer reads both); which keys it uses is
decided by its first record: `thinking_prediction`/`answer_prediction` (the challenge schema) or
`thinking`/`answer` (an earlier draft of the rules). Every record must then use the same keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from core.answer_rule import THINKING_LENGTH_LIMIT
from core.records import lone_surrogate, record_problem, shown_id

THINK_TAGS = ("<think>", "</think>")
# (thinking key, answer key) of each submission schema, tried in this order on the first record.
SCHEMAS = {"official": ("thinking_prediction", "answer_prediction"), "older-draft": ("thinking", "answer")}


class SubmissionError(ValueError):
    """A meta or submission file that cannot be scored; the message names file:line, id and field."""


@dataclass(frozen=True)
class Prediction:
    id: str
    thinking: str
    answer: str
    where: str  # "file:line", for messages


@dataclass
class Submission:
    predictions: dict[str, Prediction]
    path: str
    format: str  # "jsonl" or "json-list"
    schema: str = "official"  # "official" ({id, thinking_prediction, answer_prediction}) or "older-draft"
    unknown_ids: list[str] = field(default_factory=list)  # filled by `match`
    missing_ids: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise SubmissionError(f"{where}: not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise SubmissionError(f"{where}: not valid JSON ({err.msg})") from None


def _records(path: Path) -> tuple[str, Iterator[tuple[str, Any]]]:
    """("jsonl" | "json-list", (where, record) pairs). A file starting with `[` is a JSON list."""
    if not path.is_file():
        raise SubmissionError(f"{path}: file not found")
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip()
    if head.startswith(b"["):
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise SubmissionError(f"{path}: not UTF-8 (byte offset {err.start})") from None
        except json.JSONDecodeError as err:
            raise SubmissionError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(records, list):
            raise SubmissionError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        return "json-list", ((f"{path}[{i}]", r) for i, r in enumerate(records))
    return "jsonl", _json_lines(path)


def load_meta(path: str | Path) -> list[dict]:
    """Benchmark records (MMAR schema), validated for what scoring needs."""
    path = Path(path)
    _, records = _records(path)
    items, seen = [], {}
    for where, rec in records:
        if not isinstance(rec, dict):
            raise SubmissionError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        rid = rec.get("id")
        label = f"{where} (id={shown_id(rid)})"
        # the same rule inference applies (core.records), so a file one accepts the other does too
        if (problem := record_problem(rec, ("id", "question", "choices", "answer"))) is not None:
            raise SubmissionError(f"{label}: {problem}")
        rubric = rec.get("rubric")
        if rubric is not None:
            for i, criterion in enumerate(rubric):
                allowed = criterion.get("choices") if isinstance(criterion, dict) else None
                if not isinstance(allowed, list) or not allowed or not all(
                    isinstance(c, (int, float)) for c in allowed
                ) or not all(isinstance(criterion.get(k), str) for k in ("name", "scoring_point")):
                    raise SubmissionError(
                        f"{label}: rubric[{i}]: needs string 'name' and 'scoring_point' and numeric 'choices'"
                    )
        if rid in seen:
            raise SubmissionError(f"{label}: id: duplicate of {seen[rid]}")
        seen[rid] = where
        items.append(rec)
    if not items:
        raise SubmissionError(f"{path}: no records")
    return items


def _prediction(rec: Any, where: str, thinking_key: str, answer_key: str) -> Prediction:
    if not isinstance(rec, dict):
        raise SubmissionError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    rid = rec.get("id")
    if not isinstance(rid, str) or not rid:
        raise SubmissionError(f"{where}: id: missing or not a string (got {rid!r})")
    if (problem := lone_surrogate(rec)) is not None:  # the same rule `infer validate` applies
        raise SubmissionError(f"{where} (id={shown_id(rid)}): {problem}")
    for key in (thinking_key, answer_key):
        if key not in rec:
            raise SubmissionError(f"{where} (id={rid}): {key}: missing")
        if not isinstance(rec[key], str):
            raise SubmissionError(f"{where} (id={rid}): {key}: expected a string, got {type(rec[key]).__name__}")
    return Prediction(id=rid, thinking=rec[thinking_key], answer=rec[answer_key], where=where)


def submission_schema(rec: Any, where: str) -> str:
    """The schema whose keys the first record carries most of (the challenge one on a tie)."""
    if not isinstance(rec, dict):
        raise SubmissionError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    return max(SCHEMAS, key=lambda name: sum(key in rec for key in SCHEMAS[name]))


def load_submission(path: str | Path) -> Submission:
    """Read a submission: JSONL or a JSON list, in the challenge schema or the older draft one."""
    path = Path(path)
    fmt, records = _records(path)
    sub = Submission(predictions={}, path=str(path), format=fmt)
    keys = None
    for where, rec in records:
        if keys is None:
            sub.schema = submission_schema(rec, where)
            keys = SCHEMAS[sub.schema]
        pred = _prediction(rec, where, *keys)
        if pred.id in sub.predictions:
            raise SubmissionError(f"{where} (id={pred.id}): id: duplicate of {sub.predictions[pred.id].where}")
        sub.predictions[pred.id] = pred
        if len(pred.thinking) >= THINKING_LENGTH_LIMIT:
            sub.warnings.append(
                f"{where} (id={pred.id}): thinking_prediction: {len(pred.thinking)} characters, the rules "
                f"allow under {THINKING_LENGTH_LIMIT} (the official scorer warns and still judges it)"
            )
        if any(tag in pred.thinking for tag in THINK_TAGS):
            sub.warnings.append(f"{where} (id={pred.id}): thinking_prediction: contains <think>/</think> tags")
    return sub


def match(sub: Submission, meta: list[dict]) -> Submission:
    """Record which benchmark ids the submission lacks (scored as wrong) and which it adds (ignored)."""
    known = {rec["id"] for rec in meta}
    sub.missing_ids = [rec["id"] for rec in meta if rec["id"] not in sub.predictions]
    sub.unknown_ids = [pid for pid in sub.predictions if pid not in known]
    return sub


def convert_json_list(src: str | Path, dst: str | Path) -> int:
    """A submission in the older draft schema (`[{"id", "thinking", "answer"}]`) -> challenge JSONL;
    returns the record count."""
    src, dst = Path(src), Path(dst)
    sub = load_submission(src)
    if sub.schema != "older-draft":
        raise SubmissionError(f"{src}: expected records of {{id, thinking, answer}} (the older draft schema); "
                              "this file already uses the challenge schema")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with dst.open("w", encoding="utf-8") as out:
        for p in sub.predictions.values():
            out.write(json.dumps({"id": p.id, "thinking_prediction": p.thinking, "answer_prediction": p.answer},
                                 ensure_ascii=False) + "\n")
    return len(sub.predictions)
