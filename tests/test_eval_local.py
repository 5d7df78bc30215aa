"""The local transformers judge on the tiny random thinker: its garbage replies end as parse failures."""

from __future__ import annotations

import json

from core.recipe import load_recipe
from eval.score import score


def test_local_judge_garbage_is_reported_as_parse_failures(tiny_checkpoint, synthetic_dir, tmp_path):
    records = [json.loads(line) for line in (synthetic_dir / "test.jsonl").read_text().splitlines()]
    sub = tmp_path / "sub.jsonl"
    sub.write_text("".join(json.dumps({"id": r["id"], "thinking_prediction": "I listen closely.",
                                       "answer_prediction": r["answer"]}) + "\n" for r in records[:2]))
    recipe = load_recipe(None, [
        f"eval.meta={synthetic_dir / 'test.jsonl'}", f"eval.submission={sub}", f"eval.report_dir={tmp_path / 'r'}",
        "eval.judge.backend=local", f"eval.judge.model={tiny_checkpoint}", f"eval.judge.cache={tmp_path / 'c.sqlite'}",
        "eval.judge.max_attempts=2", "eval.judge.max_tokens=12", "eval.bootstrap=0", "eval.charts=false",
    ])
    report = score(recipe, progress=False)
    judge = report["judge"]
    assert report["judge_name"] == f"local:{tiny_checkpoint}"
    assert judge["calls_made"] == 2 * 5 * 2 == judge["parse_failures"]  # 2 items x 5 ratings x 2 attempts
    assert judge["failed_ratings"] == 10 and judge["cached"] == 0
    assert sorted(x["id"] for x in report["not_evaluated"]) == sorted(r["id"] for r in records[:2])
    assert report["totals"]["not_evaluated"] == 2 and report["totals"]["n"] == len(records) - 2
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## NOT EVALUATED (2 items)" in md and "Parse failures (first ones):" in md
    assert "no parsable reply after 2 attempts" in md
