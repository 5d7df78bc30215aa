"""The submission file: append-only JSONL that survives kills, and its validator.

A submission line is exactly `{"id", "thinking_prediction", "answer_prediction"}` (PROTOCOL.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from core.answer_rule import THINKING_LENGTH_LIMIT
from core.items import DataError, load_items
from core.qwen_omni import THINK_CLOSE, THINK_OPEN
from core.records import lone_surrogate, shown_id

SUBMISSION_KEYS = ("id", "thinking_prediction", "answer_prediction")


def read_records(path: str | Path) -> list[dict]:
    """Records of a JSONL file this package appends to; a torn last line (a killed run) is cut off.

    Only the last line may be torn: a bad line before it means the file was edited by hand or by
    something else, which is an error rather than something to repair silently.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records, good_bytes = [], 0
    with path.open("rb") as handle:
        lines = handle.readlines()
    for lineno, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict) or "id" not in obj:
                raise ValueError("not a JSON object with an id")
        except ValueError as err:
            if lineno == len(lines):  # torn tail: drop it from the file, redo that record
                with path.open("r+b") as handle:
                    handle.truncate(good_bytes)
                break
            raise DataError(f"{path}:{lineno}: {err}; not a file written by `infer run`") from None
        if not line.endswith(b"\n"):  # complete JSON but no newline: finish the line
            with path.open("ab") as handle:
                handle.write(b"\n")
        records.append(obj)
        good_bytes += len(line) + (0 if line.endswith(b"\n") else 1)
    return records


def append_records(path: str | Path, records: Iterable[dict]) -> None:
    """Append lines and push them to disk: finished work survives a kill right after."""
    with Path(path).open("a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def write_records(path: str | Path, records: Iterable[dict]) -> None:
    """Replace a JSONL file atomically: write beside it under a per-process name, then rename, so
    several processes writing the same file at once (shards) can never tear it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def validate_submission(path: str | Path, meta: str | Path, allow_unmatched: bool = False,
                        require_all: bool = True) -> tuple[list[str], list[str]]:
    """(errors, warnings) of a submission against the benchmark metadata, each naming line, id and field.

    An answer that is not one of the item's choices is an error, or a warning with `allow_unmatched`
    (the official scorer scores any string, but only a choice verbatim is always scored right).
    `require_all=False` checks the lines present without asking for every item (a partial run).
    """
    path = Path(path)
    items = {item.id: item for item in load_items(meta, check_audio=False)}
    if not path.is_file():
        return [f"{path}: file not found"], []
    errors: list[str] = []
    warnings: list[str] = []
    first_line: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                errors.append(f"{where}: empty line")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                errors.append(f"{where}: not valid JSON ({err.msg})")
                continue
            if not isinstance(obj, dict):
                errors.append(f"{where}: expected a JSON object, got {type(obj).__name__}")
                continue
            rid = obj.get("id")
            label = f"{where} (id={shown_id(rid)})"
            if (problem := lone_surrogate(obj)) is not None:  # scoring refuses it too (eval.submission)
                errors.append(f"{label}: {problem}")
            for key in SUBMISSION_KEYS:
                if key not in obj:
                    errors.append(f"{label}: {key}: missing")
                elif not isinstance(obj[key], str):
                    errors.append(f"{label}: {key}: expected a string, got {type(obj[key]).__name__}")
            for key in sorted(set(obj) - set(SUBMISSION_KEYS)):
                errors.append(f"{label}: {key}: unexpected key (allowed: {', '.join(SUBMISSION_KEYS)})")
            if not isinstance(rid, str):
                continue
            if rid in first_line:
                errors.append(f"{label}: id: duplicate of line {first_line[rid]}")
                continue
            first_line[rid] = lineno
            if rid not in items:
                errors.append(f"{label}: id: not in {meta}")
                continue
            thinking = obj.get("thinking_prediction")
            if isinstance(thinking, str):
                if len(thinking) >= THINKING_LENGTH_LIMIT:
                    errors.append(f"{label}: thinking_prediction: {len(thinking)} characters, must be under {THINKING_LENGTH_LIMIT}")
                for tag in (THINK_OPEN, THINK_CLOSE):
                    if tag in thinking:
                        errors.append(f"{label}: thinking_prediction: contains the tag {tag}")
            answer = obj.get("answer_prediction")
            if isinstance(answer, str) and answer not in items[rid].choices:
                (warnings if allow_unmatched else errors).append(
                    f"{label}: answer_prediction: {answer!r} is not one of its choices {list(items[rid].choices)!r}")
    missing = [rid for rid in items if rid not in first_line]
    if missing and require_all:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        errors.append(f"{path}: id: {len(missing)} of {len(items)} items of {meta} missing: {shown}")
    return errors, warnings
