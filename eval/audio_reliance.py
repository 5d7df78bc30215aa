"""Audio-reliance curation: which items a model answers without hearing them (AudioMCQ's split, arXiv 2509.21060).

    python -m eval audio-reliance NORMAL.jsonl SILENT.jsonl --meta META.jsonl --out audio_reliance.jsonl

NORMAL and SILENT are two submissions of the same items by the same model: one with the clips, one with each clip
replaced by silence of its length (`infer.audio_ablation: silence`). Per item, under the official answer rule:
    weak-audio      right without the audio: the question, choices or priors give the answer away (SFT material)
    audio-reliant   right with the audio, wrong without it: the answer needs the clip (RL material)
    unsolved        wrong either way
    missing         absent from one of the two submissions: not labelled
Writes one JSONL line per meta item (id, both results, label, its category, sub-category and modality) and returns
the counts, overall and per sub-category. Standard library and numpy only, as all scoring.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from core.answer_rule import is_correct
from eval.submission import SubmissionError, load_meta, load_submission

LABELS = ("weak-audio", "audio-reliant", "unsolved", "missing")


def label(with_audio: bool | None, without_audio: bool | None) -> str:
    if with_audio is None or without_audio is None:
        return "missing"
    if without_audio:
        return "weak-audio"
    return "audio-reliant" if with_audio else "unsolved"


def audio_reliance(normal: str | Path, silent: str | Path, meta_path: str | Path) -> list[dict]:
    """Per meta item: {id, correct_with_audio, correct_silent, label, category, sub-category, modality}."""
    meta = load_meta(meta_path)
    sides = [load_submission(path).predictions for path in (normal, silent)]
    if not any(rec["id"] in sides[0] and rec["id"] in sides[1] for rec in meta):
        raise SubmissionError(f"{normal} and {silent} share no item of {meta_path}")
    rows = []
    for rec in meta:
        results = [is_correct(side[rec["id"]].answer, rec["answer"], rec["choices"]) if rec["id"] in side else None
                   for side in sides]
        rows.append({"id": rec["id"], "correct_with_audio": results[0], "correct_silent": results[1],
                     "label": label(*results), "category": rec.get("category"), "sub-category": rec.get("sub-category"),
                     "modality": rec.get("modality")})
    return rows


def summary(rows: list[dict]) -> dict:
    """Items per label, overall and per sub-category."""
    per_task: dict[str, Counter] = {}
    for row in rows:
        per_task.setdefault(str(row["sub-category"]), Counter())[row["label"]] += 1
    overall = Counter(row["label"] for row in rows)
    return {"items": len(rows), "labels": {name: overall.get(name, 0) for name in LABELS},
            "by_sub_category": {task: {name: c.get(name, 0) for name in LABELS} for task, c in sorted(per_task.items())}}


def write_rows(path: str | Path, rows: list[dict]) -> None:
    """The per-item JSONL, written whole (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    os.replace(tmp, path)
