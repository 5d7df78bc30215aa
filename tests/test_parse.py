import pytest

from core.answer_rule import THINKING_LENGTH_LIMIT
from infer.parse import cut_thinking, match_choice, parse_output, split_output

CHOICES = ["the first tone", "the second tone", "both are equal"]


def test_split_at_the_last_close_tag_and_strip_every_tag():
    text = "<think>\nfirst idea</think> retry <think>more</think>\n\nthe second tone"
    thinking, answer, truncated = split_output(text)
    assert thinking == "first idea retry more"
    assert answer == "the second tone"
    assert not truncated


def test_several_close_tags_answer_after_the_last():
    parsed = parse_output("a</think>the first tone</think>\n\nthe second tone", CHOICES)
    assert parsed.answer == "the second tone" and parsed.rule == "exact"
    assert parsed.thinking == "athe first tone"
    assert "</think>" not in parsed.thinking and "<think>" not in parsed.thinking


def test_no_close_tag_is_truncated_and_searches_only_the_last_paragraph():
    text = "<think>\nMaybe the first tone, maybe the second tone.\n\nSo far I think it is the second tone"
    parsed = parse_output(text, CHOICES)
    assert parsed.truncated
    assert parsed.thinking == text.removeprefix("<think>\n")
    assert parsed.answer == "the second tone" and parsed.rule == "truncated:contains_choice"
    undecided = parse_output("<think>\nthe first tone or the second tone", CHOICES)
    assert undecided.truncated and undecided.answer == "" and undecided.rule == "empty" and not undecided.matched


@pytest.mark.parametrize(
    "answer_text, choice, rule",
    [
        ("the second tone", "the second tone", "exact"),
        ("  The Second   Tone. ", "the second tone", "normalized"),
        ("**Answer:** the second tone", "the second tone", "normalized"),
        ("**The answer is: The second tone**", "the second tone", "normalized"),
        ("B", "the second tone", "letter"),
        ("(B)", "the second tone", "letter"),
        ("B.", "the second tone", "letter"),
        ("Option B", "the second tone", "letter"),
        ("**C**", "both are equal", "letter"),
        ("B. the second tone", "the second tone", "letter"),
        ("I am fairly sure it is the second tone, since it rises.", "the second tone", "contains_choice"),
        ("second", "the second tone", "within_choice"),
        ("The tone that came second", "the second tone", "tokens"),
    ],
)
def test_answer_rules(answer_text, choice, rule):
    parsed = parse_output(f"<think>\nreasoning\n</think>\n\n{answer_text}", CHOICES)
    assert (parsed.answer, parsed.rule, parsed.matched) == (choice, rule, True)
    assert parsed.answer_text == answer_text.strip()


def test_nested_choices_prefer_the_longest_and_ambiguity_is_unmatched():
    assert match_choice("I hear a dog barking loudly", ["dog", "a dog barking", "cat"]) == ("a dog barking", "contains_choice")
    assert match_choice("either the first tone or the second tone", CHOICES) == (None, "unmatched")
    # a letter label naming another choice's text is a conflict, not a letter answer
    assert match_choice("A. the second tone", CHOICES) == ("the second tone", "contains_choice")


def test_unmatched_answer_keeps_the_raw_text_and_empty_answer_is_flagged():
    parsed = parse_output("<think>hmm</think>\n\n  Something else entirely. ", CHOICES)
    assert (parsed.answer, parsed.rule, parsed.matched) == ("Something else entirely.", "unmatched", False)
    empty = parse_output("<think>hmm</think>\n\n  ", CHOICES)
    assert (empty.answer, empty.rule, empty.truncated) == ("", "empty", False)
    markdown_only = parse_output("<think>hmm</think>**Answer:**", CHOICES)
    assert markdown_only.rule == "empty"


def test_letter_beyond_the_choices_does_not_match():
    assert match_choice("F", CHOICES) == (None, "unmatched")


def test_empty_choice_never_matches_by_containment():
    assert match_choice("nothing at all", ["", "a cat"]) == (None, "unmatched")


def test_long_thinking_is_cut_at_the_last_sentence_end_without_inserting_text():
    sentence = "The second tone is higher (about 880 Hz). "  # 42 characters
    thinking = sentence * 300  # 12,600 characters
    kept, was_cut = cut_thinking(thinking)
    assert was_cut and len(kept) < THINKING_LENGTH_LIMIT
    assert thinking.startswith(kept) and kept.endswith("(about 880 Hz).")  # a prefix: nothing inserted
    assert len(kept) == 238 * 42 - 1  # the last whole sentence that fits: 238 x 42 = 9,996 characters
    # A period inside a word ("880.5") or at the very limit is no sentence end; a question mark with a quote is.
    tricky = "x" * 9_000 + ' Is it "higher?" ' + "y" * 900 + " 880.5 Hz " + "z" * 200
    assert cut_thinking(tricky)[0] == tricky[:9_000] + ' Is it "higher?"'
    # No sentence end: the last space; no space either: the limit.
    assert cut_thinking("w" * 9_995 + " " + "v" * 10)[0] == "w" * 9_995
    assert cut_thinking("u" * 12_000)[0] == "u" * (THINKING_LENGTH_LIMIT - 1)
    assert cut_thinking("x" * (THINKING_LENGTH_LIMIT - 1)) == ("x" * (THINKING_LENGTH_LIMIT - 1), False)
    parsed = parse_output("<think>" + thinking + "</think>the first tone", CHOICES)
    assert parsed.thinking_cut and parsed.thinking == kept.strip() and parsed.answer == "the first tone"
