"""Issue 16, items 1 and 2: the official figures of a partial submission, and the official schema in
a `.json` list.

The expected figures are computed here from an independent statement of the official scripts
(`code/evaluation.py` and `code/evaluation_rubrics.py` of the MMAR repository), not from eval/:
merge each SUBMITTED record with its metadata, skip records the metadata does not know, score the
answer by the token rule, ask the judge 5 times for correct ones, drop an item whose rater fails
every attempt, and divide by the items that remain.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from core.recipe import load_recipe
from eval.__main__ import headline
from eval.score import score
from eval.submission import SubmissionError, load_submission

RATERS, ATTEMPTS = 5, 3


def official_string_match(answer: str, prediction: str, choices: list[str]) -> bool:
    """The rule as the official scripts state it: word sets, all of the answer's, none only of a wrong choice."""
    def words(text):
        return set(re.findall(r"\b\w+\b", text.lower()))

    said, wanted = words(prediction), words(answer)
    if not said:
        return False
    others = set()
    for choice in choices:
        if words(choice) != wanted:
            others |= words(choice) - wanted
    return wanted <= said and not (said & others)


def _digest(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16)


def judged_criteria(question: str) -> int | None:
    """How many of 5 criteria the scripted judge awards for a question; None: it never replies in JSON."""
    value = _digest(question)
    return None if value % 61 == 0 else value % 6


class PromptJudge:
    """A deterministic judge (temperature 0): its reply depends on the prompt only."""

    identity, max_workers = "prompt-judge", 4

    def complete(self, system: str, user: str) -> str:
        question = user.split("- Question: ", 1)[1].split("\n- Correct Answer: ", 1)[0]
        k = judged_criteria(question)
        if k is None:
            return "I cannot rate this."
        return json.dumps([{"name": "c", "score": int(i < k), "justification": "-"} for i in range(5)])


def official_figures(meta: list[dict], submission: list[dict]) -> dict:
    """evaluation_rubrics.py's totals for `submission`, restated: only submitted, known items count."""
    by_id = {rec["id"]: rec for rec in meta}
    total = correct = 0
    score_sum = 0.0
    for record in submission:
        item = {**record, **by_id.get(record["id"], {})}
        if "question" not in item:  # a record the metadata does not know lacks keys: skipped
            continue
        if not official_string_match(item["answer"], item["answer_prediction"], item["choices"]):
            total += 1
            continue
        k = judged_criteria(item["question"])
        if k is None:  # a rater failed every attempt: NOT EVALUATED, out of every denominator
            continue
        ratings = sorted([k / 5] * RATERS)
        total += 1
        correct += 1
        score_sum += sum(ratings[1:-1]) / 3
    return {"n": total, "accuracy": 100 * correct / total, "rubrics": 100 * score_sum / total}


def partial_submission(meta: list[dict]) -> list[dict]:
    """Every 10th item left out; the rest answered right, wrong, or as a sentence; one unknown id."""
    records = []
    for n, rec in enumerate(meta):
        if n % 10 == 7:
            continue
        wrong = next(c for c in rec["choices"] if c != rec["answer"])
        answer = [rec["answer"], wrong, f"The answer is {rec['answer']}."][n % 3]
        records.append({"id": rec["id"], "thinking_prediction": f"Reasoning about {rec['id']}.",
                        "answer_prediction": answer})
    records.append({"id": "not-in-the-benchmark", "thinking_prediction": "x", "answer_prediction": "y"})
    return records


@pytest.fixture(scope="module")
def real(mmar_meta):
    return [json.loads(line) for line in mmar_meta.read_text(encoding="utf-8").splitlines() if line.strip()]


def _recipe(meta_path, sub_path, tmp_path):
    return load_recipe(None, [f"eval.meta={meta_path}", f"eval.submission={sub_path}",
                              f"eval.report_dir={tmp_path / 'report'}", f"eval.judge.cache={tmp_path / 'c.sqlite'}",
                              f"eval.judge.max_attempts={ATTEMPTS}", "eval.judge.backoff_s=0", "eval.bootstrap=0",
                              "eval.charts=false"])


def test_headline_gives_the_official_figures_of_a_partial_submission(real, mmar_meta, tmp_path):
    submission = partial_submission(real)
    sub_path = tmp_path / "partial.json"  # a .json list in the challenge schema (item 2)
    sub_path.write_text(json.dumps(submission))
    report = score(_recipe(mmar_meta, sub_path, tmp_path), progress=False, backend=PromptJudge())

    expected = official_figures(real, submission)
    official = report["official"]
    assert official["n"] == expected["n"]
    assert official["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
    assert official["rubrics"] == pytest.approx(expected["rubrics"], abs=1e-9)
    assert official["crs"] == pytest.approx(expected["rubrics"] / expected["accuracy"])
    # Ours, beside them: the missing ids count as wrong, so the denominator is larger by their number.
    every = report["totals"]
    missing = len(real) // 10  # 4 of the 40-record sample
    assert missing > 0 and len(report["missing_ids"]) == missing and report["unknown_ids"] == ["not-in-the-benchmark"]
    assert every["n"] == official["n"] + missing
    assert every["correct"] == official["correct"]
    assert every["accuracy"] == pytest.approx(100 * official["correct"] / every["n"])
    assert every["accuracy"] < official["accuracy"] and every["rubrics"] < official["rubrics"]
    print(f"\nofficial: {official['accuracy']:.2f} / {official['rubrics']:.2f} over {official['n']}; "
          f"all items: {every['accuracy']:.2f} / {every['rubrics']:.2f} over {every['n']}")

    # Both labelled, in the printed line, the report and the JSON.
    line = headline(report, tmp_path / "report" / "report.md")
    assert (f"official (submitted items): Accuracy {official['accuracy']:.2f}  Rubrics {official['rubrics']:.2f}"
            in line)
    assert f"all items ({missing} missing count wrong): Accuracy {every['accuracy']:.2f}" in line
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"| Accuracy | {official['accuracy']:.2f} | {every['accuracy']:.2f} |" in md
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["official"]["accuracy"] == official["accuracy"] and "submitted" in saved["official"]["label"]
    assert saved["totals"]["accuracy"] == every["accuracy"] and "count as wrong" in saved["totals"]["label"]


def test_a_json_list_is_read_by_its_keys(tmp_path):
    official = [{"id": "a", "thinking_prediction": "t", "answer_prediction": "x"}]
    for name, records, schema in [("official.json", official, "official"),
                                  ("older.json", [{"id": "a", "thinking": "t", "answer": "x"}], "older-draft")]:
        path = tmp_path / name
        path.write_text(json.dumps(records))
        sub = load_submission(path)
        assert (sub.format, sub.schema, sub.predictions["a"].thinking, sub.predictions["a"].answer) == (
            "json-list", schema, "t", "x")
    jsonl = tmp_path / "sub.jsonl"
    jsonl.write_text(json.dumps(official[0]) + "\n")
    assert (load_submission(jsonl).format, load_submission(jsonl).schema) == ("jsonl", "official")
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(official + [{"id": "b", "thinking": "t", "answer": "x"}]))
    with pytest.raises(SubmissionError, match=r"mixed.json\[1\] \(id=b\): thinking_prediction: missing"):
        load_submission(mixed)
    not_a_list = tmp_path / "dict.json"
    not_a_list.write_text("[1]")
    with pytest.raises(SubmissionError, match=r"dict.json\[0\]: expected a JSON object, got int"):
        load_submission(not_a_list)
