"""The official scoring rules: answer rule on the real benchmark, judge prompt, reply parsing, trimmed mean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.answer_rule import is_correct
from eval.protocol import JUDGE_SYSTEM_PROMPT, ReplyError, judge_user_prompt, parse_judge_reply, trimmed_mean

GOLDEN = Path(__file__).parent / "data" / "judge_prompt_golden.txt"


@pytest.fixture(scope="module")
def meta(mmar_meta) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, mmar_meta.read_text(encoding="utf-8").splitlines())}


def check(rec: dict, prediction: str) -> bool:
    return is_correct(prediction, rec["answer"], rec["choices"])


# ---------------------------------------------------------------- answer rule


def test_every_exact_choice_passes_and_no_bare_letter_does(meta):
    for rec in meta.values():
        assert check(rec, rec["answer"]), rec["id"]
        for letter in "ABCDEF":
            # A one-letter answer text would be the only way a letter passes; MMAR has none.
            assert not check(rec, letter) and not check(rec, f"({letter})"), rec["id"]


def test_hand_made_cases_on_a_real_item(meta):
    rec = meta["qx8hrhBZJ98_00-01-32_00-02-02"]  # choices: Mountain Canyon / Dense Forest / Open Grassland / City Streets
    assert rec["answer"] == "Open Grassland"
    assert check(rec, "Open Grassland")
    assert check(rec, "open grassland.")  # case and punctuation do not matter
    assert check(rec, "Grassland open")  # word order is ignored (token sets)
    assert check(rec, "Grassland, open grassland")  # repetition too
    assert not check(rec, "C")  # bare letter
    assert not check(rec, "Open Grassland, not Dense Forest")  # a token only a wrong choice has
    assert not check(rec, "Grassland")  # an answer token is missing
    assert not check(rec, "")
    assert not check(rec, "...")  # no word token at all
    assert check(rec, "The answer is Open Grassland.")  # no wrong choice has 'the', 'answer' or 'is'


def test_the_answer_is_fails_when_a_wrong_choice_holds_those_words(meta, mmar_facts):
    rec = meta["6Nd-v8lmIDc_00-00-10_00-00-30"]  # a wrong choice is "Stay the same": 'the' is a wrong-choice token
    assert check(rec, "Gradually speeding up")
    assert not check(rec, "The answer is Gradually speeding up.")
    # Over the whole benchmark 90 items fail so (9.0 %, docs/protocol.md), listed in tests/data/mmar_facts.json;
    # on the records at hand the rule must fail exactly on the listed ones.
    listed = set(mmar_facts["the_answer_is_fails"])
    assert len(listed) == 90
    failing = {r["id"] for r in meta.values() if not check(r, f"The answer is {r['answer']}.")}
    assert failing and failing == listed & set(meta)


def test_choices_with_the_answers_token_set_are_ignored(meta):
    rec = meta["SHM5MV3oLCk_00-00-00_00-00-15"]  # "Mono first, stereo later" vs "Stereo first, mono later"
    assert rec["answer"] == "Mono first, stereo later"
    assert check(rec, "Stereo first, mono later")  # same token set: the official rule cannot tell them apart
    assert not check(rec, "Mono mixed in between stereo")


def test_a_wrong_choice_inside_the_answer(meta):
    rec = meta["KYGj2xHDQAg_00-00-00_00-00-17"]  # Tennis / Badminton / Table Tennis / Table Soccer
    assert rec["answer"] == "Table Tennis"
    assert check(rec, "table tennis")
    assert not check(rec, "Tennis")  # misses 'table'
    assert not check(rec, "Table Tennis or Table Soccer")  # 'soccer'


# ---------------------------------------------------------------- judge prompt


def test_user_prompt_matches_the_official_text_exactly(meta):
    # The golden file was rendered by the official script's prompt builder (MMAR code/evaluation_rubrics.py).
    rec = meta["qx8hrhBZJ98_00-01-32_00-02-02"]
    prompt = judge_user_prompt(rec["question"], rec["answer"], rec["thinking"], rec["rubric"],
                               "  The clip has throat singing.\n    Long song style too.", rec["answer"])
    assert prompt == GOLDEN.read_text(encoding="utf-8")


def test_user_prompt_sections_and_what_is_hidden(meta):
    rec = meta["qx8hrhBZJ98_00-01-32_00-02-02"]
    prompt = judge_user_prompt(rec["question"], rec["answer"], rec["thinking"], rec["rubric"],
                               "line one\n\t  indented line\r\nlast", "Open Grassland")
    heads = [line for line in prompt.splitlines() if line.startswith("## ")]
    assert heads == ["## Ground Truth & Problem Context", "## Evaluation Rubric & Scoring",
                     "## Required Output Format", "## Model's Submission to Evaluate"]
    assert prompt.count("### Criterion: ") == 5
    assert all(not line[:1].isspace() for line in prompt.splitlines())  # every line left-stripped
    assert prompt.endswith("- Model's Reasoning:\nline one\nindented line\nlast The answer is Open Grassland.")
    for criterion in rec["rubric"]:
        assert criterion["note"] not in prompt  # notes are not shown
    assert "Score Options: [0, 1]" in prompt
    assert "Throat Singing, Long Song" not in prompt  # nor the joined cues
    assert JUDGE_SYSTEM_PROMPT.startswith("You are a impartial and meticulous AI evaluator.")


# ---------------------------------------------------------------- judge replies

RUBRIC = [{"name": f"c{i}", "scoring_point": "p", "note": "n", "choices": [0, 1]} for i in range(5)]


def reply(scores, **extra) -> str:
    return json.dumps([{"name": f"c{i}", "score": s, "justification": "j", **extra} for i, s in enumerate(scores)])


def test_valid_replies_give_k_over_5():
    assert parse_judge_reply(reply([1, 1, 0, 1, 0]), RUBRIC) == pytest.approx(0.6)
    wrapped = "Here is my evaluation:\n```json\n" + reply([1, 1, 1, 1, 1]) + "\n```\nThanks."
    assert parse_judge_reply(wrapped, RUBRIC) == 1.0
    assert parse_judge_reply(reply([0.0, 1.0, 0, 0, 0]), RUBRIC) == pytest.approx(0.2)  # 1.0 is in [0, 1]
    renamed = json.dumps([{"name": "other", "score": 1} for _ in range(5)])
    assert parse_judge_reply(renamed, RUBRIC) == 1.0  # names are not enforced (official: a warning only)


@pytest.mark.parametrize("bad, why", [
    ("I think the model did well overall.", "invalid JSON"),  # no list at all
    ('[{"name": "c0", "score": 1,}]', "invalid JSON"),  # bad JSON inside the list
    ('{"name": "c0", "score": 1}', "not a JSON list"),
    (json.dumps([{"name": "c0", "score": 1}] * 4), "length mismatch"),  # wrong length
    (json.dumps([{"name": "c0", "score": 1}] * 6), "length mismatch"),
    (reply([1, 1, 2, 1, 1]), "not in allowed choices"),  # score out of the allowed choices
    (reply([1, 1, -1, 1, 1]), "not in allowed choices"),
    (reply([1, "1", 1, 1, 1]), "must be numeric"),  # non-numeric
    (reply([1, None, 1, 1, 1]), "must be numeric"),
    (json.dumps([{"name": "c0"}] * 5), "'name' and 'score'"),
    (json.dumps([1, 2, 3, 4, 5]), "'name' and 'score'"),
    ("", "invalid JSON"),
])
def test_malformed_replies_are_rejected(bad, why):
    with pytest.raises(ReplyError, match=why):
        parse_judge_reply(bad, RUBRIC)
    with pytest.raises(ReplyError):
        parse_judge_reply(None, RUBRIC)


# ---------------------------------------------------------------- trimmed mean


def test_trimmed_mean_drops_lowest_and_highest():
    assert trimmed_mean([0.2, 1.0, 0.6, 0.0, 0.8]) == pytest.approx((0.2 + 0.6 + 0.8) / 3)
    assert trimmed_mean([0.4, 0.4, 0.4, 0.4, 0.4]) == pytest.approx(0.4)
    assert trimmed_mean([0.0, 1.0, 1.0]) == 1.0  # three ratings: keeps the middle one
    assert trimmed_mean([0.2, 0.8]) == pytest.approx(0.5)  # fewer than 3: all of them
    assert trimmed_mean([0.6]) == 0.6
    with pytest.raises(ValueError):
        trimmed_mean([])
