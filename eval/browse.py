"""The results browser: one or two scored runs as one self-contained HTML page.

    python -m eval browse runs/tiny/base/eval runs/tiny/eval --out runs/tiny/browse.html

Each RUN is what `eval score` wrote (its report folder or `report.json`); from it the page also reads
the submission and benchmark the report names, the `.raw.jsonl` beside the submission (truncated
outputs, thinking budget), and the judge's replies from the judge cache the report's recipe names
(the same cache keys the scorer used, so only replies to this very submission come back). Optional:
a submission of the same model answering with silent audio (`--silent`), for audio reliance.

The page works offline from disk: CSS, script and data are inline (no CDN, no server), each clip is
a path relative to the HTML file. Every text of the model, the benchmark and the judge is data: it is
embedded as JSON in a `<script type="application/json">` block with `<`, `>` and `&` escaped, and the
page's script only ever sets it as text, never as markup.
Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from urllib.parse import quote

from core.answer_rule import is_correct
from core.recipe import RecipeError, load_recipe
from eval.cache import JudgeCache, cache_key
from eval.compare import compare
from eval.judge import sampling_settings
from eval.protocol import JUDGE_SYSTEM_PROMPT, ReplyError, judge_user_prompt, reply_entries
from eval.report import cue_hits
from eval.side_by_side import raw_path
from eval.submission import SubmissionError, _json_lines, load_meta, load_submission

TEMPLATE = Path(__file__).with_name("browse.html")
DATA_MARK = "__BROWSE_DATA__"
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
RAW_FLAGS = ("truncated", "thinking_budget_fired", "thinking_cut")
# report.json's per-item fields (eval.report.ItemResult) the page shows in place; any other is listed as it is
ITEM_FIELDS = {"id", "modality", "category", "sub_category", "status", "correct", "score", "ratings", "cues_found",
               "cues_total", "reason"}


def report_file(run: str | Path) -> Path:
    """A run's report.json: the path itself, or the file in the folder."""
    path = Path(run)
    path = path / "report.json" if path.is_dir() else path
    if not path.is_file():
        raise SubmissionError(f"{run}: no report.json (score the run first: python -m eval score RECIPE "
                              "eval.submission=... eval.report_dir=...)")
    return path


def load_report(run: str | Path) -> tuple[Path, dict]:
    path = report_file(run)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SubmissionError(f"{path}: not a JSON report ({err})") from None
    if not isinstance(report, dict):
        raise SubmissionError(f"{path}: not a report of `eval score` (a JSON {type(report).__name__}, not an object)")
    if missing := [key for key in ("submission", "meta", "items", "official", "totals", "tables") if key not in report]:
        raise SubmissionError(f"{path}: not a report of `eval score` (missing {', '.join(missing)})")
    return path, report


def raw_flags(submission: str | Path) -> dict[str, dict] | None:
    """id -> the flags `infer run` wrote beside the submission; None when there is no raw file."""
    raw = raw_path(submission)
    if not raw.is_file():
        return None
    flags = {}
    for where, record in _json_lines(raw):
        if not isinstance(record, dict) or "id" not in record:
            raise SubmissionError(f"{where}: expected a JSON object with an id (a .raw.jsonl of `infer run`)")
        flags[record["id"]] = {key: bool(record.get(key, False)) for key in RAW_FLAGS}
    return flags


def judge_verdicts(report: dict, meta: dict[str, dict], predictions: dict) -> tuple[dict[str, dict], str | None]:
    """(id -> {criteria: the rubric's names, raters: per rater [score, justification] per criterion}, a note
    when there are none).

    The replies come from the judge cache under the scorer's own keys (judge model, prompt, rater,
    sampling settings): the prompt holds the submission's reasoning, so a cache shared by many runs
    still gives each run only its own verdicts. Entries pair with criteria by position, as the
    official parser scores them (it does not enforce the names).
    """
    if not report.get("judged"):
        return {}, None
    try:
        judge = load_recipe(report["recipe_file"]).eval.judge
    except (KeyError, OSError, RecipeError) as err:
        return {}, f"judge reasons not shown: the report's recipe could not be read ({err})"
    if not Path(judge.cache).is_file():
        return {}, f"judge reasons not shown: no judge cache at {judge.cache}"
    settings = sampling_settings(judge)
    keys: dict[str, list[str]] = {}
    for item in report["items"]:
        rec, pred = meta.get(item["id"]), predictions.get(item["id"])
        if item["status"] in ("scored", "not_evaluated") and rec is not None and pred is not None:
            user = judge_user_prompt(rec["question"], rec["answer"], rec.get("thinking") or "", rec.get("rubric") or [],
                                     pred.thinking, pred.answer)
            keys[item["id"]] = [cache_key(report["judge_name"], JUDGE_SYSTEM_PROMPT, user, r, settings)
                                for r in range(judge.ratings)]
    cache = JudgeCache(judge.cache)
    try:
        replies = cache.get_many([key for ks in keys.values() for key in ks])
    finally:
        cache.close()
    verdicts = {}
    for rid, ks in keys.items():
        raters = [_entries(replies.get(key)) for key in ks]
        if any(raters):
            verdicts[rid] = {"criteria": [c["name"] for c in meta[rid]["rubric"]], "raters": raters}
    return verdicts, None if verdicts or not keys else f"judge reasons not shown: none of them in {judge.cache}"


def _entries(reply: str | None) -> list[list]:
    """[score, justification] per criterion of a stored reply (empty when there is none)."""
    try:
        entries = reply_entries(reply)
    except ReplyError:
        return []
    return [[e.get("score"), str(e.get("justification", ""))] if isinstance(e, dict) else [None, ""] for e in entries]


def silent_answers(path: str | Path, meta: dict[str, dict], answers: dict) -> dict[str, dict]:
    """id -> {answer, correct, changed} of a run answering with silent audio (audio reliance)."""
    predictions = load_submission(path).predictions
    out = {}
    for rid, pred in predictions.items():
        rec = meta.get(rid)
        if rec is not None:
            out[rid] = {"answer": pred.answer, "correct": is_correct(pred.answer, rec["answer"], rec["choices"]),
                        "changed": rid in answers and pred.answer != answers[rid].answer}
    return out


def clip_link(rec: dict, meta_path: Path, audio_root: Path | None, page_dir: Path) -> tuple[str | None, bool]:
    """(the clip's URL relative to the page, whether the file exists); (None, False) for a record without one."""
    if not isinstance(rec.get("audio_path"), str) or not rec["audio_path"]:
        return None, False
    clip = (audio_root or meta_path.parent) / rec["audio_path"]
    relative = os.path.relpath(clip.resolve(), page_dir.resolve())
    return quote(Path(relative).as_posix()), clip.is_file()


def load_run(run: str | Path, silent: str | Path | None = None) -> dict:
    """One run: its report, submission, raw flags, judge replies and optional silent-audio answers."""
    path, report = load_report(run)
    sub = load_submission(report["submission"])
    meta = {rec["id"]: rec for rec in load_meta(report["meta"])}
    if unknown := [it["id"] for it in report["items"] if it["id"] not in meta]:
        raise SubmissionError(f"{path}: {len(unknown)} items not in {report['meta']} (first: {unknown[0]}); "
                              "the benchmark changed since scoring: score the run again")
    verdicts, judge_note = judge_verdicts(report, meta, sub.predictions)
    return {"path": path, "report": report, "meta": meta, "meta_path": Path(report["meta"]),
            "predictions": sub.predictions, "flags": raw_flags(report["submission"]), "verdicts": verdicts,
            "judge_note": judge_note, "silent": silent_answers(silent, meta, sub.predictions) if silent else None,
            "silent_path": str(silent) if silent else None}


def _item_side(run: dict, item: dict) -> dict:
    rid = item["id"]
    pred = run["predictions"].get(rid)
    cues = run["meta"][rid].get("cue") or []
    thinking = pred.thinking if pred else ""
    side = {"status": item["status"], "correct": item["correct"], "score": item["score"], "ratings": item["ratings"],
            "reason": item.get("reason"), "thinking": thinking, "answer": pred.answer if pred else None,
            "cues_found": item["cues_found"], "cues_total": item["cues_total"],
            # per cue, the report's own rule (report.cue_hits), so the marks add up to its cue recall
            "cue_hits": [bool(cue_hits([c], thinking)[0]) for c in cues if isinstance(c, str) and c.strip()]}
    if run["flags"] is not None:
        side["flags"] = run["flags"].get(rid)
    if rid in run["verdicts"]:
        side["judge"] = run["verdicts"][rid]
    if run["silent"] is not None:
        side["silent"] = run["silent"].get(rid)
    if extra := {key: value for key, value in item.items() if key not in ITEM_FIELDS}:
        side["extra"] = extra  # what a later `eval score` adds per item (e.g. an audio-reliance field)
    return side


def _run_summary(run: dict, name: str) -> dict:
    report = run["report"]
    flags = run["flags"]
    return {"name": name, "report": str(run["path"]), "submission": report["submission"], "judged": report.get("judged", False),
            "judge_name": report.get("judge_name"), "official": report["official"], "totals": report["totals"],
            "confidence": report.get("confidence", {}), "tables": report["tables"], "counting": report.get("counting"),
            "missing": len(report.get("missing_ids", [])), "has_flags": flags is not None,
            "flag_counts": {key: sum(f[key] for f in flags.values()) for key in RAW_FLAGS} if flags else None,
            "judge_note": run["judge_note"], "silent": run["silent_path"],
            "silent_accuracy": (100 * sum(s["correct"] for s in run["silent"].values()) / len(run["silent"])
                                if run["silent"] else None)}


def payload(runs: list[dict], names: list[str], page_dir: Path, audio_root: Path | None = None) -> dict:
    """Everything the page shows, as plain JSON."""
    first = runs[0]
    order = [it["id"] for it in first["report"]["items"]]
    by_run = [{it["id"]: it for it in run["report"]["items"]} for run in runs]
    for run, items in zip(runs[1:], by_run[1:]):
        if set(items) != set(order):
            raise SubmissionError(f"{first['path']} and {run['path']} score different benchmarks "
                                  f"({len(set(order) ^ set(items))} ids in one only); compare runs of the same one")
    items = []
    for rid in order:
        rec = first["meta"][rid]
        audio, found = clip_link(rec, first["meta_path"], audio_root, page_dir)
        items.append({"id": rid, "modality": rec.get("modality"), "category": rec.get("category"),
                      "sub_category": rec.get("sub-category"), "question": rec["question"], "choices": rec["choices"],
                      "answer": rec["answer"], "reference": rec.get("thinking"), "cues": [c for c in rec.get("cue") or []
                                                                                          if isinstance(c, str) and c.strip()],
                      "audio": audio, "audio_found": found,
                      "runs": [_item_side(run, items_of[rid]) for run, items_of in zip(runs, by_run)]})
    out = {"generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "meta": str(first["meta_path"]),
           "runs": [_run_summary(run, name) for run, name in zip(runs, names)], "items": items, "paired": None}
    if len(runs) == 2:
        paired = compare(runs[0]["path"], runs[1]["path"])
        out["paired"] = {key: paired[key] for key in ("items", "both_correct", "both_wrong", "a_only_correct", "b_only_correct",
                                                      "mcnemar_p", "accuracy_delta", "accuracy_delta_ci")}
    return out


def embed(data: dict) -> str:
    """JSON safe inside a <script> block: no `</script>`, `<!--` or other markup can close or open anything.
    A lone surrogate (valid in JSON, not in UTF-8) stays an escape, so any decoded text can be written."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def browse(run_paths: list[str | Path], out: str | Path, silent: list[str | Path] | None = None,
           names: list[str] | None = None, audio_root: str | Path | None = None) -> Path:
    """Write the page for one or two runs; returns its path."""
    if not 1 <= len(run_paths) <= 2:
        raise SubmissionError(f"browse takes one or two runs, got {len(run_paths)}")
    silent = [None if s in (None, "-") else s for s in silent or []]
    if len(silent) > len(run_paths):
        raise SubmissionError(f"--silent: {len(silent)} submissions for {len(run_paths)} runs (one per run, in order)")
    silent += [None] * (len(run_paths) - len(silent))
    names = list(names or []) or [Path(report_file(r)).parent.as_posix() for r in run_paths]
    if len(names) != len(run_paths):
        raise SubmissionError(f"--names: {len(names)} names for {len(run_paths)} runs")
    out = Path(out)
    runs = [load_run(r, s) for r, s in zip(run_paths, silent)]
    data = payload(runs, names, out.parent, Path(audio_root) if audio_root else None)
    html = TEMPLATE.read_text(encoding="utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html.replace(DATA_MARK, embed(data), 1), encoding="utf-8")
    return out
