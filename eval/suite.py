"""A benchmark suite: every benchmark of a recipe's `suite` section answered and scored by one command.

    python -m eval suite RECIPE [dotted.key=value ...] [--score-only]
    python -m eval suite-compare RUN_A RUN_B [--out compare.json]

Per benchmark (eval/benchmarks.py): its metadata is read in its own schema, the items it can score
are written in the project's item form to `suite.out_dir/<name>/items.jsonl`, `python -m infer run`
answers them into `<name>/submission.jsonl` (a subprocess with the recipe's model and infer
settings; it resumes, so an interrupted suite re-run only answers what is missing), and the answers
are scored by the benchmark's rule. Items a benchmark cannot score here are counted by reason.
MMAU's test set (answers withheld) gets `<name>/mmau_submission.json`, the file MMAU's evaluation
takes, instead of a score.

Writes `suite.json` (per benchmark: totals, per-category tables, counts, every item's result) and
`suite.md`. `suite-compare` pairs two suite runs item by item: per benchmark and over every item,
the accuracy difference B - A with its 95 % paired bootstrap interval and the exact McNemar test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from core.recipe import Recipe, save_recipe
from eval.benchmarks import BENCHMARKS, chance, mmau_test_submission, read_items, score_items, summary, tables
from eval.compare import mcnemar_exact_p, paired_delta_ci
from eval.report import bootstrap_ci
from eval.submission import SubmissionError, _records, load_submission


def write_items(path: Path, items: list[dict]) -> None:
    """Rewrite only when the items changed: `infer run` resumes against this file."""
    text = "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def answer_benchmark(recipe_file: Path, items_file: Path, submission: Path, limit: int | None) -> None:
    """`python -m infer run` on one benchmark's items (its own process: eval does not import infer)."""
    command = [sys.executable, "-m", "infer", "run", str(recipe_file), f"infer.meta={items_file}",
               f"infer.output={submission}", f"infer.limit={'null' if limit is None else limit}"]
    print("suite: " + " ".join(command), flush=True)
    done = subprocess.run(command)
    if done.returncode != 0:
        raise RuntimeError(f"infer run failed for {items_file} (exit {done.returncode}); finished answers are kept, "
                           "re-run the suite to resume")


def predictions(submission: Path) -> dict[str, str]:
    if not submission.is_file():
        return {}
    return {rid: p.answer for rid, p in load_submission(submission).predictions.items()}


def run_suite(recipe: Recipe, answer: bool = True) -> dict:
    cfg = recipe.suite
    if not cfg.benchmarks:
        raise SubmissionError(f"recipe {recipe.name}: suite.benchmarks: none listed")
    out = Path(cfg.out_dir)
    recipe_file = save_recipe(recipe, out / "recipe.yaml")
    results = []
    for bench in cfg.benchmarks:
        items, skipped = read_items(bench.kind, bench.meta, bench.audio_root)
        folder = out / bench.name
        items_file, submission = folder / "items.jsonl", folder / "submission.jsonl"
        write_items(items_file, items)  # every item: a changed limit still resumes the same output
        if answer and items:
            answer_benchmark(recipe_file, items_file, submission, bench.limit)
        items = items[: bench.limit] if bench.limit is not None else items
        preds = predictions(submission)
        rows = score_items(bench.kind, items, preds)
        scored = [r for r in rows if r["status"] != "withheld"]
        result = {"name": bench.name, "kind": bench.kind, "meta": bench.meta, "official_rule": BENCHMARKS[bench.kind].official,
                  "submission": str(submission), "items": len(items), "not_answered": skipped,
                  "chance": chance([it for it in items if not it.get("answer_withheld")]) if scored else None,
                  "totals": summary(rows), "tables": tables(bench.kind, scored), "rows": rows}
        correct = np.array([bool(r["correct"]) for r in scored], dtype=float)
        result["totals"]["accuracy_ci"] = bootstrap_ci(correct, cfg.bootstrap, 0)
        if len(scored) < len(rows):  # MMAU's test set: the file MMAU's evaluation takes
            raw = [rec for _, rec in _records(Path(bench.meta))[1]]
            target = folder / "mmau_submission.json"
            target.write_text(json.dumps(mmau_test_submission(raw, preds), indent=1, ensure_ascii=False), encoding="utf-8")
            result["test_submission"] = str(target)
        results.append(result)
    suite = {"recipe": recipe.name, "recipe_file": str(recipe_file), "benchmarks": results}
    (out / "suite.json").write_text(json.dumps(suite, indent=1, ensure_ascii=False), encoding="utf-8")
    (out / "suite.md").write_text(markdown(suite), encoding="utf-8")
    return suite


def _pct(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def markdown(suite: dict) -> str:
    lines = [f"# Suite: {suite['recipe']}", "",
             "| benchmark | kind | items | accuracy % | 95% CI | chance % | non-answers | missing | not answered here |",
             "|---|---|---:|---:|---|---:|---:|---:|---|"]
    for b in suite["benchmarks"]:
        t = b["totals"]
        ci = f"{t['accuracy_ci'][0]:.1f}–{t['accuracy_ci'][1]:.1f}" if t.get("accuracy_ci") else "–"
        skipped = "; ".join(f"{n} {why}" for why, n in b["not_answered"].items()) or "–"
        acc = "withheld (submission file)" if t["withheld"] and not t["n"] else _pct(t["accuracy"])
        lines.append(f"| {b['name']} | {b['kind']} | {b['items']} | {acc} | {ci} | {_pct(b['chance'])} "
                     f"| {t['non_answers']} | {t['missing']} | {skipped} |")
    lines += ["", "Accuracy counts missing answers and non-answers (no single choice named) as wrong; "
              "docs/eval.md says where each rule differs from its benchmark's official one.", ""]
    for b in suite["benchmarks"]:
        if b.get("test_submission"):
            lines += [f"{b['name']}: answers withheld; submission file `{b['test_submission']}`.", ""]
        for group, rows in b["tables"].items():
            if not rows:
                continue
            lines += [f"## {b['name']}: by {group}", "", f"| {group} | n | accuracy % | non-answers |", "|---|---:|---:|---:|"]
            lines += [f"| {r['name']} | {r['n']} | {_pct(r['accuracy'])} | {r['non_answers']} |" for r in rows] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------- two runs


def _load(path: str | Path) -> dict:
    path = Path(path)
    file = path / "suite.json" if path.is_dir() else path
    if not file.is_file():
        raise SubmissionError(f"{file}: not found (a suite run's suite.json or its folder)")
    return json.loads(file.read_text(encoding="utf-8"))


def _paired(a: dict[str, bool], b: dict[str, bool], resamples: int, seed: int) -> dict | None:
    ids = sorted(set(a) & set(b))
    if not ids:
        return None
    ca = np.array([a[i] for i in ids], dtype=float)
    cb = np.array([b[i] for i in ids], dtype=float)
    gained, lost = int(((1 - ca) * cb).sum()), int((ca * (1 - cb)).sum())
    return {"items": len(ids), "accuracy_a": 100 * ca.mean(), "accuracy_b": 100 * cb.mean(),
            "accuracy_delta": 100 * (cb.mean() - ca.mean()), "accuracy_delta_ci": paired_delta_ci(ca, cb, resamples, seed),
            "b_only_correct": gained, "a_only_correct": lost, "mcnemar_p": mcnemar_exact_p(lost, gained)}


def compare_suites(path_a, path_b, resamples: int = 1000, seed: int = 0) -> dict:
    """Per benchmark both runs hold, and over all their items, the paired comparison B - A."""
    runs = [_load(path_a), _load(path_b)]
    correct = [{b["name"]: {r["id"]: bool(r["correct"]) for r in b["rows"] if r["status"] != "withheld"}
                for b in run["benchmarks"]} for run in runs]
    shared = [name for name in correct[0] if name in correct[1]]
    rows = [{"benchmark": name, **(_paired(correct[0][name], correct[1][name], resamples, seed) or {"items": 0})}
            for name in shared]
    pooled = [{f"{name}/{i}": c for name in shared for i, c in side[name].items()} for side in correct]
    return {"a": str(path_a), "b": str(path_b), "benchmarks": rows, "all": _paired(*pooled, resamples, seed),
            "only_in_a": sorted(set(correct[0]) - set(shared)), "only_in_b": sorted(set(correct[1]) - set(shared))}


def compare_markdown(c: dict) -> str:
    lines = [f"# A = `{c['a']}`  vs  B = `{c['b']}`", "",
             "| benchmark | paired items | A % | B % | B - A | 95% paired CI | fixed | broken | McNemar p |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for row in c["benchmarks"] + ([{"benchmark": "**all**", **c["all"]}] if c["all"] else []):
        if not row["items"]:
            lines.append(f"| {row['benchmark']} | 0 | | | | | | | |")
            continue
        lo, hi = row["accuracy_delta_ci"]
        lines.append(f"| {row['benchmark']} | {row['items']} | {row['accuracy_a']:.1f} | {row['accuracy_b']:.1f} "
                     f"| {row['accuracy_delta']:+.1f} | {lo:+.1f} to {hi:+.1f} | {row['b_only_correct']} "
                     f"| {row['a_only_correct']} | {row['mcnemar_p']:.3g} |")
    if c["only_in_a"] or c["only_in_b"]:
        lines += ["", f"Unpaired benchmarks left out: A only {c['only_in_a']}, B only {c['only_in_b']}."]
    return "\n".join(lines) + "\n"
