"""The benchmark adapters (eval/benchmarks.py): each fixture read in its released schema, and each
scoring rule on cases worked by hand from its official scorer (MMAU evaluation.py `string_match`,
MMSU mmsu_evaluation.py, MMAU-Pro evaluate_mmau_pro_comprehensive.py), with the cases where ours
differs on purpose (docs/eval.md) asserted as such. Standard library only: no model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.benchmarks import (
    BENCHMARKS,
    chance,
    mmau_test_submission,
    named_choice,
    read_items,
    score_items,
    score_named_choice,
    score_token_rule,
    summary,
    tables,
)
from eval.submission import SubmissionError

DATA = Path(__file__).parent / "data"
MAN = ["Man", "Woman", "Child", "Robot"]  # mmau-test-mini 3fe64f3d-...: answer "Man"
TIMES = ["1.50 to 4.00", "4.50 to 7.00", "7.40 to 10.10", "10.50 to 13.00"]  # 5f3fc487-...: answer "7.40 to 10.10"
SIX = ["five", "sixteen", "seventeen", "six"]  # f995bc92-...: answer "six"
MMSU = ["Happy", "Sad", "Angry", "Neutral"]  # tests/data/mmsu_sample.jsonl mmsu-fixture-0001: answer_gt "Sad"


@pytest.mark.parametrize("prediction, choices, answer, official", [
    # string_match: every answer token in the prediction, no token only of a wrong choice
    ("Man", MAN, "Man", True),
    ("The speaker is a man.", MAN, "Man", True),  # extra words that belong to no choice are fine
    ("a man, not a woman", MAN, "Man", False),  # "woman" is a wrong choice's token
    ("", MAN, "Man", False),  # no tokens: False
    ("7.40 to 10.10", TIMES, "7.40 to 10.10", True),  # \b\w+\b splits "7.40" into 7 and 40
    ("between 7.40 and 10.10", TIMES, "7.40 to 10.10", False),  # lacks the answer's token "to"
    ("7.40 to 10.50", TIMES, "7.40 to 10.10", False),  # "50" belongs to wrong choices only
    ("six", SIX, "six", True),
    ("sixteen", SIX, "six", False),  # whole tokens: "sixteen" is not "six", and it is a wrong choice
])
def test_mmau_rule_is_string_match(prediction, choices, answer, official):
    assert score_token_rule(prediction, answer, choices).correct is official


def test_mmau_rule_reads_the_answer_after_the_thinking():
    # the thinking names a wrong choice; only the text after </think> is the answer
    out = score_token_rule("<think>Sounds like a woman? No, a deep voice.</think>Man", "Man", MAN)
    assert out.correct and out.answered
    wrong = score_token_rule("<think>a deep voice</think>I cannot tell from this clip.", "Man", MAN)
    assert (wrong.correct, wrong.answered) == (False, False)  # a non-answer: wrong, counted, never guessed


@pytest.mark.parametrize("response, official, ours", [
    ("B", True, True),  # official: first character B -> choice_b "Sad" == answer_gt
    ("The answer is B.", True, True),  # official: second-last character B
    ("A", False, False),  # official: choice_a "Happy" != answer_gt
    ("", False, False),  # official: no prediction, counted wrong
    ("None", False, False),  # official: the string 'None' is no prediction, counted wrong
    ("Sad", None, True),  # official: 'S' and 'a' are no letters -> "Wrong format", left out of the total
    ("A sad voice", False, True),  # official: first character 'A' -> choice_a; ours: the token rule names "Sad"
    ("sad or angry", None, False),  # official: wrong format (left out); ours: two choices named -> non-answer
])
def test_mmsu_rule_against_the_official_letter_rule(response, official, ours):
    """`official`: what mmsu_evaluation.py does (None: it skips the record, so it is in no denominator)."""
    assert score_named_choice(response, "Sad", MMSU).correct is ours


def test_mmau_pro_closed_form_rule():
    choices = ["Piano", "Violin", "Flute", "Trumpet"]
    # official: the choice nearest by NV-Embed-v2 similarity; the answer verbatim is its own nearest (similarity 100)
    assert score_named_choice("Violin", "Violin", choices).correct
    assert score_named_choice("<think>bowed strings</think>(B)", "Violin", choices).correct
    assert score_named_choice("It is a violin.", "Violin", choices).correct
    # official: an empty output still gets a nearest choice (a guess); ours: a non-answer, wrong and counted
    empty = score_named_choice("", "Violin", choices)
    assert (empty.correct, empty.answered) == (False, False)
    both = score_named_choice("piano or violin", "Violin", choices)
    assert (both.correct, both.answered) == (False, False)


def test_named_choice_letters_and_text():
    assert named_choice("(C)", MAN) == "Child"
    assert named_choice("Answer: D", MAN) == "Robot"
    assert named_choice("E", MAN) is None  # no fifth choice
    assert named_choice("a child", MAN) == "Child"


def test_mmau_sample_reads_in_its_schema():
    items, skipped = read_items("mmau", DATA / "mmau_sample.json")
    raw = json.loads((DATA / "mmau_sample.json").read_text())
    assert skipped == {} and [it["id"] for it in items] == [r["id"] for r in raw]
    by_id = {it["id"]: it for it in items}
    # a record repeating a choice verbatim (27 of test-mini's 1,000): one choice, the answer kept
    dup = by_id["5b453322-b158-4b9a-9989-45fbeadde270"]
    assert len(dup["choices"]) == 4 and dup["answer"] in dup["choices"]
    assert by_id["43df3159-5981-4a39-9de2-437fc9f16f70"]["category"] == "Reasoning"  # given as ["Reasoning"]
    first = by_id["3fe64f3d-282c-4bc8-a753-68f8f6c35652"]
    assert first["audio_path"] == str((DATA / "test-mini-audios" / f"{first['id']}.wav").resolve())
    assert (first["task"], first["difficulty"], first["answer"]) == ("sound", "medium", "Man")


def test_mmau_test_set_is_withheld_and_written_in_mmau_format():
    items, _ = read_items("mmau", DATA / "mmau_test_sample.json")
    assert all(it["answer_withheld"] for it in items)
    rows = score_items("mmau", items, {"mmau-test-fixture-0001": "Telephone"})
    assert [r["status"] for r in rows] == ["withheld", "withheld"]
    assert summary(rows) == {"n": 0, "correct": 0, "accuracy": None, "accuracy_submitted": None,
                            "non_answers": 0, "missing": 0, "withheld": 2}
    raw = json.loads((DATA / "mmau_test_sample.json").read_text())
    out = mmau_test_submission(raw, {"mmau-test-fixture-0001": "Telephone"})
    assert out[0] == {**raw[0], "model_prediction": "Telephone", "model_output": "Telephone"}
    assert out[1]["model_output"] == ""  # unanswered: empty, as MMAU's evaluation reads a missing answer


def test_mmau_pro_sample_answers_only_single_clip_closed_form():
    items, skipped = read_items("mmau-pro", DATA / "mmau_pro_sample.jsonl", audio_root="/audio")
    assert [it["id"] for it in items] == ["mmau-pro-fixture-0001", "mmau-pro-fixture-0002", "mmau-pro-fixture-0003",
                                          "mmau-pro-fixture-0007"]
    assert items[0]["audio_path"] == "/audio/data/mmau-pro-fixture-0001.wav"
    assert skipped == {"multi-audio (infer gives one clip per prompt; not scored here)": 1,
                       "open-ended (official: LLM judge; not scored here)": 1,
                       "instruction following (official: format rules; not scored here)": 1}
    assert chance(items) == pytest.approx(100 * (1 / 4 + 1 / 4 + 1 / 3 + 1 / 4) / 4)


def test_mmsu_sample_and_its_tables():
    items, skipped = read_items("mmsu", DATA / "mmsu_sample.jsonl")
    assert skipped == {} and len(items) == 6
    assert items[0]["choices"] == MMSU and items[0]["answer"] == "Sad"
    answers = {"mmsu-fixture-0001": "B", "mmsu-fixture-0002": "never", "mmsu-fixture-0003": "A statement",
               "mmsu-fixture-0004": "I am not sure."}  # 0005 and 0006 missing
    rows = score_items("mmsu", items, answers)
    assert [r["status"] for r in rows] == ["correct", "correct", "wrong", "non-answer", "missing", "missing"]
    total = summary(rows)
    assert (total["n"], total["correct"], total["non_answers"], total["missing"]) == (6, 2, 1, 2)
    assert total["accuracy"] == pytest.approx(100 * 2 / 6) and total["accuracy_submitted"] == pytest.approx(50.0)
    by_category = {r["name"]: (r["n"], r["correct"]) for r in tables("mmsu", rows)["category"]}
    assert by_category == {"Perception": (4, 2), "Reasoning": (2, 0)}


def test_bad_records_name_file_record_and_field(tmp_path):
    bad = tmp_path / "mmsu.jsonl"
    record = json.loads((DATA / "mmsu_sample.jsonl").read_text().splitlines()[0])
    bad.write_text(json.dumps({**record, "answer_gt": "Bored"}) + "\n")
    with pytest.raises(SubmissionError, match=r"mmsu.jsonl:1 \(id=mmsu-fixture-0001\): answer_gt"):
        read_items("mmsu", bad)
    assert set(BENCHMARKS) == {"mmar", "mmau", "mmau-pro", "mmsu"}
