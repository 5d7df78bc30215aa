"""Paired comparison of two scored runs on the same benchmark items.

Each side is a submission (JSONL or the older JSON list; correctness from the answer rule and
`--meta`) or a report (`report.json` or its folder; then Rubrics are compared too). Output: the
2x2 correct/wrong table, which items flipped, an exact McNemar test on the discordant pairs, and
a paired bootstrap interval of the difference B - A.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from core.answer_rule import is_correct
from eval.submission import SubmissionError, load_meta, load_submission


def load_side(path: str | Path, meta: list[dict] | None) -> tuple[dict[str, bool], dict[str, float] | None]:
    """(id -> correct, id -> rubric item score or None) for one side."""
    path = Path(path)
    report_file = path / "report.json" if path.is_dir() else path
    if report_file.suffix == ".json" and report_file.is_file():
        data = json.loads(report_file.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "items" in data:
            counted = [it for it in data["items"] if it["status"] != "not_evaluated"]
            scores = {it["id"]: it["score"] or 0.0 for it in counted} if data.get("judged") else None
            return {it["id"]: it["correct"] for it in counted}, scores
    if meta is None:
        raise SubmissionError(f"{path}: a submission needs --meta to be scored")
    preds = load_submission(path).predictions
    return {rec["id"]: rec["id"] in preds and is_correct(preds[rec["id"]].answer, rec["answer"], rec["choices"])
            for rec in meta}, None


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact binomial p-value for b vs c discordant pairs (1.0 when there are none)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(0, min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_delta_ci(a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    diff = b - a
    idx = rng.integers(0, diff.size, size=(resamples, diff.size))
    lo, hi = np.percentile(diff[idx].mean(axis=1), [2.5, 97.5])
    return 100.0 * float(lo), 100.0 * float(hi)


def compare(path_a, path_b, meta_path=None, resamples: int = 1000, seed: int = 0) -> dict:
    meta = load_meta(meta_path) if meta_path else None
    correct_a, score_a = load_side(path_a, meta)
    correct_b, score_b = load_side(path_b, meta)
    ids = sorted(set(correct_a) & set(correct_b))
    if not ids:
        raise SubmissionError(f"{path_a} and {path_b} share no scored item")
    gained = [i for i in ids if correct_b[i] and not correct_a[i]]
    lost = [i for i in ids if correct_a[i] and not correct_b[i]]
    ca = np.array([correct_a[i] for i in ids], dtype=float)
    cb = np.array([correct_b[i] for i in ids], dtype=float)
    out = {
        "a": str(path_a), "b": str(path_b), "items": len(ids),
        "only_in_a": len(set(correct_a) - set(correct_b)), "only_in_b": len(set(correct_b) - set(correct_a)),
        "both_correct": int((ca * cb).sum()), "both_wrong": int(((1 - ca) * (1 - cb)).sum()),
        "a_only_correct": len(lost), "b_only_correct": len(gained),
        "mcnemar_p": mcnemar_exact_p(len(lost), len(gained)),
        "accuracy_a": 100 * ca.mean(), "accuracy_b": 100 * cb.mean(), "accuracy_delta": 100 * (cb.mean() - ca.mean()),
        "accuracy_delta_ci": paired_delta_ci(ca, cb, resamples, seed),
        "flipped_to_correct": gained, "flipped_to_wrong": lost,
    }
    if score_a is not None and score_b is not None:
        sa = np.array([score_a[i] for i in ids])
        sb = np.array([score_b[i] for i in ids])
        out.update(rubrics_a=100 * sa.mean(), rubrics_b=100 * sb.mean(), rubrics_delta=100 * (sb.mean() - sa.mean()),
                   rubrics_delta_ci=paired_delta_ci(sa, sb, resamples, seed))
    return out


def markdown(c: dict) -> str:
    lines = [f"# A = `{c['a']}`  vs  B = `{c['b']}`", "", f"{c['items']} paired items.", "",
             "| | B correct | B wrong |", "|---|---:|---:|",
             f"| **A correct** | {c['both_correct']} | {c['a_only_correct']} |",
             f"| **A wrong** | {c['b_only_correct']} | {c['both_wrong']} |", "",
             f"Accuracy A {c['accuracy_a']:.2f}, B {c['accuracy_b']:.2f}, B-A {c['accuracy_delta']:+.2f} "
             f"(95% paired bootstrap CI {c['accuracy_delta_ci'][0]:+.2f} to {c['accuracy_delta_ci'][1]:+.2f}); "
             f"exact McNemar p = {c['mcnemar_p']:.4g}."]
    if "rubrics_delta" in c:
        lo, hi = c["rubrics_delta_ci"]
        lines.append(f"Rubrics A {c['rubrics_a']:.2f}, B {c['rubrics_b']:.2f}, B-A {c['rubrics_delta']:+.2f} "
                     f"(95% CI {lo:+.2f} to {hi:+.2f}).")
    if c["only_in_a"] or c["only_in_b"]:
        lines.append(f"Unpaired items left out: {c['only_in_a']} only in A, {c['only_in_b']} only in B.")
    lines += ["", f"Wrong in A, correct in B ({len(c['flipped_to_correct'])}): "
              + ", ".join(c["flipped_to_correct"]),
              "", f"Correct in A, wrong in B ({len(c['flipped_to_wrong'])}): " + ", ".join(c["flipped_to_wrong"]), ""]
    return "\n".join(lines)
