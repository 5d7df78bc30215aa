"""`eval side-by-side`: per-task format rate and accuracy of two runs, hand-computed."""

from __future__ import annotations

import json

import pytest

from eval.__main__ import main
from eval.side_by_side import side_by_side
from eval.submission import SubmissionError

META = [
    {"id": "a1", "question": "q", "choices": ["x", "y"], "answer": "x", "sub-category": "A"},
    {"id": "a2", "question": "q", "choices": ["x", "y"], "answer": "y", "sub-category": "A"},
    {"id": "b1", "question": "q", "choices": ["u", "v"], "answer": "u", "sub-category": "B"},
    {"id": "b2", "question": "q", "choices": ["u", "v"], "answer": "v", "sub-category": "B"},
]


def write_run(folder, answers: dict[str, str], closed: set[str]):
    """A submission and its raw file, as `infer run` writes them; `closed` replies have a </think>."""
    folder.mkdir(parents=True, exist_ok=True)
    sub = folder / "submission.jsonl"
    sub.write_text("".join(json.dumps({"id": i, "thinking_prediction": "t", "answer_prediction": a}) + "\n"
                           for i, a in answers.items()))
    (folder / "submission.raw.jsonl").write_text("".join(
        json.dumps({"id": i, "truncated": i not in closed, "matched": a in ("x", "y", "u", "v")}) + "\n"
        for i, a in answers.items()))
    return sub


@pytest.fixture
def runs(tmp_path):
    meta = tmp_path / "meta.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in META))
    base = write_run(tmp_path / "base", {"a1": "x", "a2": "x", "b1": "no idea", "b2": "v"}, closed={"b1"})
    tuned = write_run(tmp_path / "tuned", {"a1": "x", "a2": "y", "b1": "u", "b2": "u"}, closed={"a1", "a2", "b1", "b2"})
    on_train = write_run(tmp_path / "train", {"a1": "x", "b1": "v"}, closed={"a1", "b1"})
    return meta, base, tuned, on_train


def test_rates_per_task_and_the_paired_difference(runs):
    meta, base, tuned, on_train = runs
    result = side_by_side(base, tuned, meta, on_train, meta)
    rows = {row["task"]: row for row in result["rows"]}
    assert list(rows) == ["A", "B", "all"]
    # base: a1 right (truncated), a2 wrong, b1 unmatched (closed), b2 right (truncated) -> format: none
    assert rows["A"]["base"] == {"n": 2, "format": 0.0, "accuracy": 50.0}
    assert rows["B"]["base"] == {"n": 2, "format": 0.0, "accuracy": 50.0}
    assert rows["all"]["tuned"] == {"n": 4, "format": 100.0, "accuracy": 75.0}
    assert rows["B"]["tuned_on_train"] == {"n": 1, "format": 100.0, "accuracy": 0.0}
    paired = result["paired"]
    assert paired["accuracy_delta"] == 25.0 and (paired["b_only_correct"], paired["a_only_correct"]) == (2, 1)


def test_cli_prints_the_table_and_writes_json(runs, tmp_path, capsys):
    meta, base, tuned, on_train = runs
    out = tmp_path / "sbs.json"
    assert main(["side-by-side", str(base), str(tuned), "--meta", str(meta), "--train-submission", str(on_train),
                 "--train-meta", str(meta), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| **all** | 4 | 0.0 | 50.0 | 100.0 | 75.0 | 50.0 (n=2) |" in printed
    assert "accuracy tuned - base +25.0 points" in printed
    assert json.loads(out.read_text())["rows"][-1]["task"] == "all"


def test_a_submission_without_raw_outputs_is_named(runs):
    meta, base, tuned, _ = runs
    (tuned.parent / "submission.raw.jsonl").unlink()
    with pytest.raises(SubmissionError, match=r"tuned/submission.raw.jsonl: file not found"):
        side_by_side(base, tuned, meta)


def test_silent_runs_add_the_audio_reliance_columns(runs, tmp_path, capsys):
    meta, base, tuned, _ = runs
    base_silent = write_run(tmp_path / "base_silent", {"a1": "x", "a2": "x", "b1": "u", "b2": "u"}, closed=set())
    tuned_silent = write_run(tmp_path / "tuned_silent", {"a1": "y", "a2": "y", "b1": "v", "b2": "v"}, closed=set())
    result = side_by_side(base, tuned, meta, base_silent=base_silent, tuned_silent=tuned_silent)
    rows = {row["task"]: row for row in result["rows"]}
    assert rows["all"]["base_silent"]["accuracy"] == 50.0 and rows["all"]["tuned_silent"]["accuracy"] == 50.0
    assert rows["A"]["tuned_silent"]["accuracy"] == 50.0
    # base: 50 % with and without audio at chance 50 %: no gap, no flag; tuned: 75 -> 50, all of its gap lost
    assert result["reliance"]["base"]["reliance"] is None
    assert result["reliance"]["tuned"]["reliance"] == 1.0 and result["reliance"]["tuned"]["changed"] == 75.0
    assert main(["side-by-side", str(base), str(tuned), "--meta", str(meta), "--base-silent", str(base_silent),
                 "--tuned-silent", str(tuned_silent)]) == 0
    printed = capsys.readouterr().out
    assert "| **all** | 4 | 0.0 | 50.0 | 100.0 | 75.0 | 50.0 | 50.0 |" in printed
    assert "Audio reliance, tuned (4 items" in printed and "75.0 -> 50.0 %" in printed
