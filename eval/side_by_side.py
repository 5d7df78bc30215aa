"""Base versus fine-tuned, per task type: format rate and accuracy side by side, and the paired test.

    python -m eval side-by-side BASE.jsonl TUNED.jsonl --meta TEST.jsonl \\
        [--train-submission ON_TRAIN.jsonl --train-meta TRAIN.jsonl] \\
        [--base-silent BASE_SILENT.jsonl --tuned-silent TUNED_SILENT.jsonl] [--out side_by_side.json]

Format: the reply closes `</think>` and its answer names exactly one choice (the `truncated` and
`matched` flags `infer run` writes to the `.raw.jsonl` beside each submission). Accuracy: the
official answer rule. The fine-tuned model's accuracy on training items, when given, stands beside
its held-out accuracy so overfitting shows. Each model's answers with every clip replaced by silence
(`infer.audio_ablation=silence`), when given, add its accuracy without the audio per task and the
reliance line of `eval reliance` (a model that listens falls to about chance). The paired comparison is `eval compare`'s (difference
tuned - base with its 95 % paired bootstrap interval, exact McNemar test).
"""

from __future__ import annotations

import json
from pathlib import Path

from core.answer_rule import is_correct
from eval.compare import compare
from eval.reliance import reliance_figures, verdict
from eval.submission import SubmissionError, _json_lines, load_meta, load_submission

GROUP = "sub-category"
ALL = "all"


def raw_path(submission: str | Path) -> Path:
    """The raw outputs `infer run` writes beside a submission (infer.run.RunPaths)."""
    path = Path(submission)
    return path.with_name(path.name.removesuffix(".jsonl") + ".raw.jsonl")


def item_results(submission: str | Path, meta: list[dict]) -> dict[str, dict]:
    """id -> {group, formatted, correct} for every answered item of `meta` (a missing one is neither)."""
    predictions = load_submission(submission).predictions
    raw = raw_path(submission)
    if not raw.is_file():
        raise SubmissionError(f"{raw}: file not found (the raw outputs beside {submission} tell the format)")
    flags = {}
    for where, record in _json_lines(raw):
        if not isinstance(record, dict) or not {"id", "truncated", "matched"} <= set(record):
            raise SubmissionError(f"{where}: expected id, truncated and matched (a .raw.jsonl of `infer run`)")
        flags[record["id"]] = not record["truncated"] and record["matched"]
    answered = [rec for rec in meta if rec["id"] in predictions]
    return {rec["id"]: {
        "group": rec.get(GROUP) or "(none)",
        "formatted": flags.get(rec["id"], False),
        "correct": is_correct(predictions[rec["id"]].answer, rec["answer"], rec["choices"]),
    } for rec in answered}


def rates(results: dict[str, dict], group: str) -> dict | None:
    chosen = [r for r in results.values() if group == ALL or r["group"] == group]
    if not chosen:
        return None
    return {"n": len(chosen), "format": 100 * sum(r["formatted"] for r in chosen) / len(chosen),
            "accuracy": 100 * sum(r["correct"] for r in chosen) / len(chosen)}


def side_by_side(base, tuned, meta_path, train_submission=None, train_meta_path=None, seed: int = 0,
                 base_silent=None, tuned_silent=None) -> dict:
    meta = load_meta(meta_path)
    runs = {"base": item_results(base, meta), "tuned": item_results(tuned, meta)}
    if train_submission is not None:
        if train_meta_path is None:
            raise SubmissionError("--train-submission needs --train-meta, the training records it answered")
        runs["tuned_on_train"] = item_results(train_submission, load_meta(train_meta_path))
    silent = {name: path for name, path in (("base", base_silent), ("tuned", tuned_silent)) if path is not None}
    for name, path in silent.items():
        runs[f"{name}_silent"] = item_results(path, meta)
    groups = sorted({r["group"] for r in runs["tuned"].values()}) + [ALL]
    rows = [{"task": g, **{name: rates(results, g) for name, results in runs.items()}} for g in groups]
    result = {"rows": rows, "paired": compare(base, tuned, meta_path, seed=seed)}
    if silent:
        answers = {path: {rid: p.answer for rid, p in load_submission(path).predictions.items()}
                   for path in (base, tuned, *silent.values())}
        normal = {"base": base, "tuned": tuned}
        result["reliance"] = {name: reliance_figures(meta, answers[normal[name]], answers[path]) for name, path in silent.items()}
    return result


def _cell(stats: dict | None, key: str) -> str:
    return "–" if stats is None else f"{stats[key]:.1f}"


def markdown(result: dict) -> str:
    on_train = any(row.get("tuned_on_train") for row in result["rows"])
    silent = [name for name in ("base", "tuned") if any(row.get(f"{name}_silent") for row in result["rows"])]
    head = ["task", "n", "base format %", "base accuracy %", "tuned format %", "tuned accuracy %"]
    head += ["tuned accuracy on train %"] if on_train else []
    head += [f"{name} accuracy, silent audio %" for name in silent]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for row in result["rows"]:
        cells = [f"**{row['task']}**" if row["task"] == ALL else row["task"], str(row["tuned"]["n"]),
                 _cell(row["base"], "format"), _cell(row["base"], "accuracy"),
                 _cell(row["tuned"], "format"), _cell(row["tuned"], "accuracy")]
        if on_train:
            train = row.get("tuned_on_train")
            cells.append(_cell(train, "accuracy") + (f" (n={train['n']})" if train else ""))
        cells += [_cell(row.get(f"{name}_silent"), "accuracy") for name in silent]
        lines.append("| " + " | ".join(cells) + " |")
    p = result["paired"]
    lo, hi = p["accuracy_delta_ci"]
    lines += ["", f"Paired ({p['items']} items): accuracy tuned - base {p['accuracy_delta']:+.1f} points "
              f"(95% paired bootstrap CI {lo:+.1f} to {hi:+.1f}); {p['b_only_correct']} items fixed, "
              f"{p['a_only_correct']} broken; exact McNemar p = {p['mcnemar_p']:.3g}."]
    for name, r in result.get("reliance", {}).items():
        lines += ["", f"Audio reliance, {name} ({r['items']} items, every clip replaced by silence of its length): accuracy "
                  f"{r['accuracy']:.1f} -> {r['accuracy_ablated']:.1f} % (chance {r['chance']:.1f} %), {r['changed']:.1f} % "
                  f"of answers change; {verdict(r)}."]
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))
