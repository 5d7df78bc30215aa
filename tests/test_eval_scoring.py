"""Scoring end to end with scripted judges: totals, cache, resume, NOT EVALUATED, input errors, compare."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from pathlib import Path

import pytest

from core.recipe import load_recipe
from eval.__main__ import main
from eval.compare import compare, mcnemar_exact_p
from eval.judge import FatalJudgeError
from eval.score import score
from eval.submission import SubmissionError, convert_json_list, load_submission

RUBRIC = [{"name": f"crit {i}", "scoring_point": f"Award 1 point if {i}.", "note": "hidden", "choices": [0, 1]}
          for i in range(5)]
ITEMS = [  # id, modality, category, answer, cues
    ("i1", "speech", "Semantic Layer", "two beeps", ["beep", "silence"]),
    ("i2", "music", "Perception Layer", "rising", ["melody"]),
    ("i3", "speech", "Perception Layer", "the dog", []),
    ("i4", "music", "Semantic Layer", "a violin", ["bow"]),
]
CHOICES = {"i1": ["two beeps", "three beeps"], "i2": ["rising", "falling"], "i3": ["the dog", "a cat"],
           "i4": ["a violin", "a flute"]}
# Five ratings per judged item, as k correct criteria out of 5.
SCRIPT = {"i1": [5, 4, 3, 1, 5], "i2": [2, 2, 0, 5, 3], "i4": [5, 5, 5, 5, 5]}
# Hand-computed: i1 -> middle of [1,3,4,5,5]/5 = (3+4+5)/15 = 0.8; i2 -> (2+2+3)/15 = 0.4667.
I1, I2 = 0.8, 7 / 15


def write_meta(path: Path) -> Path:
    with path.open("w") as f:
        for rid, modality, category, answer, cues in ITEMS:
            f.write(json.dumps({"id": rid, "audio_path": f"./audio/{rid}.wav", "question": f"Question of {rid}?",
                                "choices": CHOICES[rid], "answer": answer, "modality": modality,
                                "category": category, "sub-category": "Counting", "thinking": f"Reference {rid}.",
                                "cue": cues, "rubric": RUBRIC}) + "\n")
    return path


def write_sub(path: Path, answers: dict[str, str], thinking: str = "I hear two Beeps and some silence.") -> Path:
    with path.open("w") as f:
        for rid, answer in answers.items():
            f.write(json.dumps({"id": rid, "thinking_prediction": thinking, "answer_prediction": answer}) + "\n")
    return path


class ScriptedJudge:
    """Replies by item (recognised from the prompt's question): the n-th call for an item gets SCRIPT[n]."""

    def __init__(self, garbage_for=(), fail_after: int | None = None, workers: int = 4):
        self.identity, self.max_workers = "scripted-judge", workers
        self.garbage_for, self.fail_after = set(garbage_for), fail_after
        self.calls = defaultdict(int)
        self.lock = threading.Lock()

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def complete(self, system: str, user: str) -> str:
        rid = user.split("- Question: Question of ", 1)[1].split("?", 1)[0]
        with self.lock:
            if self.fail_after is not None and self.total >= self.fail_after:
                raise FatalJudgeError("judge went away")
            n = self.calls[rid]
            self.calls[rid] += 1
        if rid in self.garbage_for:
            return "Sure! The model did fine."
        k = SCRIPT[rid][n % 5]
        return json.dumps([{"name": c["name"], "score": int(i < k), "justification": "ok"} for i, c in enumerate(RUBRIC)])


@pytest.fixture
def setup(tmp_path):
    meta = write_meta(tmp_path / "meta.jsonl")
    # i1, i2 correct; i3 wrong; i4 missing.
    sub = write_sub(tmp_path / "sub.jsonl", {"i1": "Two beeps.", "i2": "rising", "i3": "a cat"})

    def recipe(**over):
        overrides = [f"eval.meta={meta}", f"eval.submission={sub}", f"eval.report_dir={tmp_path / 'report'}",
                     f"eval.judge.cache={tmp_path / 'cache.sqlite'}", "eval.judge.max_attempts=3",
                     "eval.bootstrap=200"] + [f"{k.replace('__', '.')}={v}" for k, v in over.items()]
        return load_recipe(None, overrides)

    return tmp_path, recipe


def test_totals_and_tables_match_a_hand_computed_example(setup):
    tmp, recipe = setup
    judge = ScriptedJudge()
    report = score(recipe(), progress=False, backend=judge)
    assert dict(judge.calls) == {"i1": 5, "i2": 5}  # the wrong and the missing item never reach the judge
    t = report["totals"]
    assert t["n"] == 4 and t["correct"] == 2
    assert t["accuracy"] == pytest.approx(50.0)
    assert t["rubrics"] == pytest.approx(100 * (I1 + I2) / 4)
    assert t["crs"] == pytest.approx((I1 + I2) / 2)
    by_mod = {r["name"]: r for r in report["tables"]["modality"]}
    assert by_mod["speech"]["accuracy"] == 50.0 and by_mod["speech"]["rubrics"] == pytest.approx(40.0)
    assert by_mod["speech"]["crs"] == pytest.approx(0.8)
    assert by_mod["music"]["rubrics"] == pytest.approx(100 * I2 / 2)
    by_cat = {r["name"]: r for r in report["tables"]["category"]}
    assert by_cat["Semantic Layer"]["rubrics"] == pytest.approx(40.0)
    assert report["missing_ids"] == ["i4"]
    # Cue recall: "beep" and "silence" found (case-insensitive), "melody" and "bow" not: 2 of 4 cues.
    assert t["cue_recall"] == pytest.approx(50.0)
    assert report["judge"]["calls_made"] == 10 and report["judge"]["cached"] == 0
    data = json.loads((tmp / "report" / "report.json").read_text())
    items = {it["id"]: it for it in data["items"]}
    assert items["i1"]["score"] == pytest.approx(I1) and sorted(items["i1"]["ratings"]) == [0.2, 0.6, 0.8, 1.0, 1.0]
    assert items["i3"]["status"] == "wrong" and items["i4"]["status"] == "missing"
    md = (tmp / "report" / "report.md").read_text()
    assert "| Accuracy | 66.67 | 50.00 |" in md and "## By sub-category" in md and "`i4`" in md
    for png in ("by_modality.png", "by_category.png"):
        assert (tmp / "report" / png).read_bytes()[:4] == b"\x89PNG"
    assert load_recipe(tmp / "report" / "recipe.yaml").eval.judge.max_attempts == 3  # the config used, saved


def test_cache_hit_makes_zero_calls(setup):
    _, recipe = setup
    first = score(recipe(), progress=False, backend=ScriptedJudge())
    judge = ScriptedJudge()
    again = score(recipe(), progress=False, backend=judge)
    assert judge.total == 0
    assert again["judge"]["calls_made"] == 0 and again["judge"]["cached"] == 10
    assert again["totals"] == first["totals"]
    # Other sampling settings are other cache keys.
    judge = ScriptedJudge()
    score(recipe(eval__judge__temperature=0.7), progress=False, backend=judge)
    assert judge.total == 10


def test_interrupted_run_resumes_without_redoing_finished_calls(setup):
    _, recipe = setup
    with pytest.raises(FatalJudgeError):
        score(recipe(), progress=False, backend=ScriptedJudge(fail_after=4, workers=1))
    judge = ScriptedJudge()
    report = score(recipe(), progress=False, backend=judge)
    assert report["judge"]["cached"] == 4 and judge.total == 6 == report["judge"]["calls_made"]
    assert report["totals"]["rubrics"] == pytest.approx(100 * (I1 + I2) / 4)


def test_items_whose_judge_calls_all_fail_are_reported_not_evaluated(setup):
    tmp, recipe = setup
    judge = ScriptedJudge(garbage_for={"i2"})
    report = score(recipe(), progress=False, backend=judge)
    assert judge.calls["i2"] == 5 * 3  # every rating asked max_attempts times
    assert [x["id"] for x in report["not_evaluated"]] == ["i2"]
    assert "no parsable reply after 3 attempts" in report["not_evaluated"][0]["reason"]
    t = report["totals"]
    assert (t["n"], t["not_evaluated"]) == (3, 1)  # left out of the denominators, and said so
    assert t["accuracy"] == pytest.approx(100 / 3) and t["rubrics"] == pytest.approx(100 * I1 / 3)
    assert report["judge"]["parse_failures"] == 15 and report["judge"]["failed_ratings"] == 5
    md = (tmp / "report" / "report.md").read_text()
    assert "## NOT EVALUATED (1 items)" in md and "`i2`" in md and "NOT EVALUATED items" in md
    # A re-run asks only for what is missing: i1 comes from the cache, i2 is judged now.
    judge = ScriptedJudge()
    report = score(recipe(), progress=False, backend=judge)
    assert dict(judge.calls) == {"i2": 5} and report["not_evaluated"] == []


def test_judge_none_reports_accuracy_only(setup):
    tmp, recipe = setup
    report = score(recipe(), progress=False)
    assert report["totals"]["accuracy"] == 50.0 and report["totals"]["rubrics"] is None
    assert report["judge"] is None and "rubrics" not in report["confidence"]
    assert "not computed" in (tmp / "report" / "report.md").read_text()


def test_bootstrap_intervals_are_seeded_and_bracket_the_estimate(setup):
    _, recipe = setup
    a = score(recipe(), progress=False, backend=ScriptedJudge())["confidence"]
    b = score(recipe(), progress=False, backend=ScriptedJudge())["confidence"]
    assert a == b
    lo, hi = a["accuracy"]
    assert 0 <= lo <= 50.0 <= hi <= 100 and hi > lo


# ---------------------------------------------------------------- submission input


def test_submission_errors_name_file_line_id_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "i1", "thinking_prediction": "x", "answer_prediction": "y"}\n'
                   '{"id": "i2", "thinking_prediction": "x"}\n')
    with pytest.raises(SubmissionError, match=r"bad.jsonl:2 \(id=i2\): answer_prediction: missing"):
        load_submission(bad)
    bad.write_text('{"id": "i1", "thinking_prediction": 3, "answer_prediction": "y"}\n')
    with pytest.raises(SubmissionError, match=r"bad.jsonl:1 \(id=i1\): thinking_prediction: expected a string"):
        load_submission(bad)
    bad.write_text('{"id": "i1", "thinking_prediction": "", "answer_prediction": "y"}\n\n{oops\n')
    with pytest.raises(SubmissionError, match=r"bad.jsonl:3: not valid JSON"):
        load_submission(bad)
    bad.write_text('{"id": "i1", "thinking_prediction": "", "answer_prediction": "y"}\n' * 2)
    with pytest.raises(SubmissionError, match=r"bad.jsonl:2 \(id=i1\): id: duplicate of .*bad.jsonl:1"):
        load_submission(bad)


def test_unknown_ids_and_warnings_are_reported(setup):
    tmp, recipe = setup
    sub = write_sub(tmp / "extra.jsonl", {"i1": "two beeps", "zz": "x"}, thinking="<think>" + "a" * 10_000)
    report = score(recipe(eval__submission=sub), progress=False)
    assert report["unknown_ids"] == ["zz"] and report["missing_ids"] == ["i2", "i3", "i4"]
    assert report["totals"]["accuracy"] == 25.0  # missing ids count as wrong
    assert any("10007 characters" in w for w in report["warnings"])
    assert any("<think>" in w for w in report["warnings"])


def test_convert_the_older_json_list(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps([{"id": "i1", "thinking": "t1", "answer": "two beeps"},
                               {"id": "i2", "thinking": "t2", "answer": "rising"}]))
    assert main(["convert", str(old), str(tmp_path / "new.jsonl")]) == 0
    lines = [json.loads(x) for x in (tmp_path / "new.jsonl").read_text().splitlines()]
    assert lines == [{"id": "i1", "thinking_prediction": "t1", "answer_prediction": "two beeps"},
                     {"id": "i2", "thinking_prediction": "t2", "answer_prediction": "rising"}]
    assert load_submission(old).predictions["i2"].answer == "rising"  # also read directly
    old.write_text(json.dumps([{"id": "i1", "answer": "x"}]))
    with pytest.raises(SubmissionError, match=r"old.json\[0\] \(id=i1\): thinking: missing"):
        convert_json_list(old, tmp_path / "n2.jsonl")


# ---------------------------------------------------------------- CLI and comparison


def test_cli_score_with_overrides(setup, capsys):
    tmp, recipe = setup
    r = recipe()
    argv = ["score", f"eval.meta={r.eval.meta}", f"eval.submission={r.eval.submission}",
            f"eval.report_dir={tmp / 'cli'}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "official (submitted items): Accuracy 66.67  Rubrics not computed  CRS –  over 3 items" in out
    assert "all items (1 missing count wrong): Accuracy 50.00  Rubrics not computed  CRS –  over 4 items" in out
    assert (tmp / "cli" / "report.md").is_file()
    assert main(["score", f"eval.meta={r.eval.meta}", "eval.submission=/nonexistent.jsonl",
                 f"eval.report_dir={tmp / 'cli2'}"]) == 2
    assert "input error: /nonexistent.jsonl: file not found" in capsys.readouterr().err
    assert not (tmp / "cli2").exists()  # nothing written for an input that does not load


def test_paired_comparison(setup):
    tmp, recipe = setup
    meta = recipe().eval.meta
    a = write_sub(tmp / "a.jsonl", {"i1": "two beeps", "i2": "falling", "i3": "the dog", "i4": "a flute"})
    b = write_sub(tmp / "b.jsonl", {"i1": "two beeps", "i2": "rising", "i3": "a cat", "i4": "a violin"})
    c = compare(a, b, meta, resamples=200, seed=0)
    assert c["flipped_to_correct"] == ["i2", "i4"] and c["flipped_to_wrong"] == ["i3"]
    assert (c["both_correct"], c["both_wrong"], c["a_only_correct"], c["b_only_correct"]) == (1, 0, 1, 2)
    assert c["accuracy_delta"] == pytest.approx(25.0)
    assert c["mcnemar_p"] == pytest.approx(1.0)  # 1 vs 2 discordant pairs: no evidence
    assert mcnemar_exact_p(0, 10) == pytest.approx(2 / 1024)
    # Reports carry rubric scores: both sides judged gives a rubric delta too.
    score(recipe(eval__report_dir=tmp / "ra"), progress=False, backend=ScriptedJudge())
    score(recipe(eval__report_dir=tmp / "rb", eval__submission=b), progress=False, backend=ScriptedJudge())
    c = compare(tmp / "ra", tmp / "rb" / "report.json", resamples=200)
    assert c["flipped_to_correct"] == ["i4"] and c["flipped_to_wrong"] == []
    assert c["rubrics_delta"] == pytest.approx(25.0)  # i4: 0 -> 1.0, over 4 items


def test_scoring_path_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, eval.__main__, eval.score, eval.compare; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
