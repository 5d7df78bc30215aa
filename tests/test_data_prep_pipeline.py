"""Stages 2-4 of the Cogito-Pipe (qa, cot, verify) with a scripted engine.

The scripted engine implements the engine interface (`generate_batches`, `tokenizer`, ...) and
answers each request from a script keyed by the request, so every path (acceptance, retries,
drops, each rejection reason) is exercised with exact counts. The real engine on the tiny
checkpoint runs the same stages in test_data_prep_pipeline_tiny.py.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest

from core.items import load_items, read_jsonl
from core.qwen_omni import AUDIO_PAD, IM_END, render_prompt
from core.recipe import DataConfig, DatasetSpec, load_recipe
from data_prep.card import write_card
from data_prep.collect import collect
from data_prep.cot import cot
from data_prep.generation import ReplyError
from data_prep.guard import ContaminationIndex, normalise_question
from data_prep.qa import load_seed_pool, parse_qa_reply, pick_shots, qa
from data_prep.stage import stage_paths
from data_prep.verify import consistency, parse_verdict, verify
from infer.engine import Engine, Generation, Request, SamplingConfig

REPO = Path(__file__).resolve().parents[1]
CARRIED = ("audio_path", "duration", "domain", "source", "licence", "metadata")
Reply = Callable[[Request, SamplingConfig], "str | tuple[str, bool]"]  # text, or (text, finished)


class Killed(RuntimeError):
    """Stands in for a kill: the engine dies in the middle of a stage."""


class ScriptedEngine(Engine):
    name = "scripted"

    def __init__(self, tokenizer, reply: Reply, batch_size: int = 2, die_after: int | None = None):
        self.tokenizer = tokenizer
        self.reply = reply
        self.sampling = SamplingConfig.greedy(16)
        self.batch_size = batch_size
        self.die_after = die_after  # requests answered before the "kill"
        self.requests: list[Request] = []
        self.samplings: list[SamplingConfig] = []

    def describe(self) -> dict:
        return {"backend": self.name}

    def generate_batches(self, requests, sampling=None):
        self.samplings.append(sampling)
        for start in range(0, len(requests), self.batch_size):
            batch = []
            for request in requests[start:start + self.batch_size]:
                if self.die_after is not None and len(self.requests) >= self.die_after:
                    raise Killed("killed")
                self.requests.append(request)
                out = self.reply(request, sampling)
                text, finished = out if isinstance(out, tuple) else (out, True)
                batch.append(Generation(request.id, text, (), 10, 5, finished, 0.0))
            yield batch


def question(clip: int, part: int, answer: str = "two beeps") -> dict:
    return {"question": f"How many beeps are heard in clip {clip}, part {part}?",
            "choices": ["one beep", "two beeps", "three beeps", "no beep at all"], "answer": answer}


def good(*items: dict) -> str:
    return json.dumps(list(items))


# Clip position in the manifest -> reply per attempt (a missing attempt repeats the last one).
QA_SCRIPT: dict[int, list] = {
    0: ["Here are the questions: " + good(question(0, 0)), good(question(0, 0), question(0, 1, "one beep"))],
    1: ['[{"question": "Q?", "choices": ["a"], "answer": "a"}]', json.dumps(question(1, 0)), (good(question(1, 0))[:30], False)],
    2: [good(question(2, 0), question(2, 1), dict(question(2, 0), question="HOW many beeps are heard in clip 2 -- part 0??"))],
    3: [good(dict(question(3, 0), answer="four beeps")), "```json\n" + good(question(3, 0)) + "\n```"],
}
QA_KEPT = {0: 2, 1: 0, 2: 2, 3: 1}  # questions per clip; every later clip: 1
QA_MALFORMED = {"malformed_reply:not_json": 1, "malformed_reply:bad_choices": 1, "malformed_reply:not_a_list": 1,
                "malformed_reply:cut_by_budget": 1, "malformed_reply:answer_not_in_choices": 1}


def qa_reply(clip_ids: list[str]) -> Reply:
    def reply(request: Request, sampling: SamplingConfig):
        clip_id, _, attempt = request.id.rpartition("#")
        position = clip_ids.index(clip_id)
        script = QA_SCRIPT.get(position, [good(question(position, 0, "three beeps"))])
        return script[min(int(attempt), len(script) - 1)]

    return reply


def recipe_for(work: Path, synthetic_dir: Path, clips: int = 8, *extra: str):
    return load_recipe(REPO / "recipes" / "tiny.yaml", [
        f"data_prep.work_dir={work}", f"data_prep.sources=[{{name: synthetic, root: {synthetic_dir}, count: {clips}}}]",
        "data_prep.qa.n_shots=3", "data_prep.qa.max_attempts=3", "data_prep.qa.batch_size=3",
        "data_prep.cot.batch_size=4", "data_prep.judge.batch_size=4", *extra,
    ])


def manifest_ids(work: Path) -> list[str]:
    return [r["id"] for _, r in read_jsonl(stage_paths(work, "collect")["output"])]


def read_out(work: Path, stage: str) -> list[dict]:
    path = stage_paths(work, stage)["output"]
    return [r for _, r in read_jsonl(path)] if path.stat().st_size else []


def thinking_of(record: dict) -> str:
    return f"I listen to clip {record['clip_id']} and count the beeps one by one: the answer follows from that count."


# CoT behaviour by position in qa.jsonl: (output, finished), then the judge's reply (None: never asked).
COT_SCRIPT = [
    ("paraphrase", '{"verdict": "pass", "reason": "consistent with the description"}'),
    ("exact", '```json\n{"verdict": "PASS", "reason": "fine"}\n```'),
    ("paraphrase", '{"verdict": "pass", "reason": "ok"}'),
    ("paraphrase", '{"verdict": "fail", "reason": "invents a dog bark"}'),
    ("paraphrase", "The reasoning is fine."),
    ("wrong", None),
    ("unsure", None),
    ("cut", None),
    ("no_close", None),
]


def cot_text(kind: str, record: dict) -> tuple[str, bool]:
    wrong = next(c for c in record["choices"] if c != record["answer"])
    think = f"<think>\n{thinking_of(record)}\n</think>\n\n"
    return {
        "paraphrase": (think + f"The answer is {record['answer']}, clearly.", True),
        "exact": (think + record["answer"], True),
        "wrong": (think + wrong, True),
        "unsure": (think + "I cannot tell from this recording.", True),
        "cut": ("<think>\nI count the beeps: one, two, and then", False),
        "no_close": ("<think>\nI count the beeps and it must be " + record["answer"], True),
    }[kind]


def test_four_stages_end_to_end_with_a_scripted_engine(tmp_path, synthetic_dir, processor):
    work = tmp_path / "work"
    recipe = recipe_for(work, synthetic_dir)
    collect(recipe.data_prep, show_progress=False)
    manifest = {r["id"]: r for _, r in read_jsonl(stage_paths(work, "collect")["output"])}
    clips = list(manifest)
    assert len(clips) == 8

    # Stage 2: retries, drops, exact counts.
    qa_engine = ScriptedEngine(processor.tokenizer, qa_reply(clips))
    report = qa(recipe, engine=qa_engine, show_progress=False)
    questions = read_out(work, "qa")
    per_clip = Counter(q["clip_id"] for q in questions)
    assert [per_clip[c] for c in clips] == [QA_KEPT.get(i, 1) for i in range(8)]
    assert report["in"] == 8 and report["out"] == 9 and report["rejected"] == {"qa_malformed": 1}
    assert report["counts"] == dict(sorted({**QA_MALFORMED, "dropped_question:duplicate_question": 1}.items()))
    attempts = Counter(r.id.rpartition("#")[0] for r in qa_engine.requests)
    assert [attempts[c] for c in clips] == [2, 3, 1, 2, 1, 1, 1, 1]  # a malformed reply is asked again, up to 3 times
    assert [s.seed for s in qa_engine.samplings] == [0, 1, 2, 0, 1, 0]  # another seed per attempt, per batch of 3 clips
    first = qa_engine.requests[0]
    assert first.audio is not None and first.prompt.count(AUDIO_PAD) == 1
    assert '"facts"' in first.prompt  # the clip's metadata
    shots = pick_shots(load_seed_pool(recipe.data_prep.seed_questions), 3, 0, clips[0], 0)
    assert all(json.dumps(s["question"]) in first.prompt for s in shots)
    assert {q["id"] for q in questions} == {f"{c}-q{k}" for c in clips for k in range(per_clip[c])}
    for q in questions:
        assert q["answer"] in q["choices"] and sorted(q["choices"]) == sorted(question(0, 0)["choices"])
        clip = manifest[q["clip_id"]]
        assert {k: q[k] for k in CARRIED} == {k: clip[k] for k in CARRIED} and q["source"] == "synthetic"
    assert len({tuple(q["choices"]) for q in questions}) > 1  # the seeded shuffle moves the answer
    assert next(q for q in questions if q["clip_id"] == clips[0])["qa_attempt"] == 1

    # Stage 3: the Thinking model sees the inference prompt, never the gold answer on its own.
    by_question = {q["id"]: (kind, judged) for q, (kind, judged) in zip(questions, COT_SCRIPT)}
    record_of = {q["id"]: q for q in questions}
    cot_engine = ScriptedEngine(processor.tokenizer, lambda r, s: cot_text(by_question[r.id][0], record_of[r.id]))
    report = cot(recipe, engine=cot_engine, show_progress=False)
    assert report["in"] == 9 and report["out"] == 9 and report["rejected"] == {}
    for request in cot_engine.requests:
        q = record_of[request.id]
        assert request.prompt == render_prompt(processor.tokenizer, q["question"], q["choices"], "baseline")
        assert request.audio is not None
    distilled = read_out(work, "cot")
    assert [d["cot_finished"] for d in distilled] == [kind != "cut" for kind, _ in COT_SCRIPT]

    # Stage 4: consistency by the shared parser, then the judge on what is left.
    judge_engine = ScriptedEngine(processor.tokenizer, lambda r, s: by_question[r.id][1])
    report = verify(recipe, engine=judge_engine, show_progress=False)
    assert report["in"] == 9 and report["out"] == 3
    assert report["rejected"] == {"answer_mismatch": 1, "answer_unmatched": 1, "cot_truncated": 2, "judge_fail": 1, "judge_unparseable": 1}
    assert report["counts"] == {"judge_unparseable:not_json": 1}
    assert [r.id for r in judge_engine.requests] == [q["id"] for q in questions[:5]]  # only consistent ones are judged
    judged = judge_engine.requests[0]
    assert judged.audio is None and AUDIO_PAD not in judged.prompt
    assert thinking_of(questions[0]) in judged.prompt and f"Correct answer: {questions[0]['answer']}" in judged.prompt

    # The SFT file: what training reads.
    sft_path = stage_paths(work, "verify")["output"]
    items = load_items(sft_path, require_thinking=True)
    assert [i.id for i in items] == [q["id"] for q in questions[:3]]
    assert [i.thinking for i in items] == [thinking_of(q) for q in questions[:3]]
    sft = read_out(work, "verify")
    assert {k for r in sft for k in r} >= {"id", "audio_path", "question", "choices", "answer", "thinking", "source", "domain", "licence"}
    assert [r["answer_rule"] for r in sft] == ["contains_choice", "exact", "contains_choice"]
    assert "cot_raw" not in sft[0] and "metadata" not in sft[0]

    from train.data import build_examples

    examples = build_examples(DataConfig(train=[DatasetSpec(path=str(sft_path))], max_length=100_000), processor,
                              "baseline", seed=0, log=lambda *_: None)
    assert len(examples) == 3
    for example in examples:
        assert example.item.thinking in example.target and example.target.endswith(example.item.answer + IM_END)
        assert example.prompt == render_prompt(processor.tokenizer, example.item.question, example.item.choices, "baseline")

    # The data card: sources, domains, licences and every stage's rejections and events.
    card = write_card(work)
    assert card["data_file"] == str(sft_path) and card["records"] == 3 and card["clips"] == 2
    assert card["by_source"]["synthetic"]["records"] == 3 and card["by_source"]["synthetic"]["proportion"] == 1.0
    assert {d: row["records"] for d, row in card["by_domain"].items()} == Counter(manifest[r["clip_id"]]["domain"] for r in sft)
    assert card["by_source"]["synthetic"]["licences"] == {"Apache-2.0 (generated by data_prep.synthetic)": 3}
    assert list(card["stages"]) == ["collect", "qa", "cot", "verify"]
    assert card["stages"]["qa"]["rejected"] == {"qa_malformed": 1} and card["stages"]["qa"]["counts"]["malformed_reply:not_json"] == 1
    markdown = (work / "data_card.md").read_text()
    assert "| verify | 9 | 3 | answer_mismatch: 1, answer_unmatched: 1, cot_truncated: 2, judge_fail: 1, judge_unparseable: 1 |" in markdown
    assert "| synthetic | 3 | 100.0 % | 2 |" in markdown
    assert "| verify | judge_unparseable:not_json: 1 |" in markdown


def test_kill_and_resume_of_qa_redoes_nothing_and_duplicates_nothing(tmp_path, synthetic_dir, processor):
    reference = recipe_for(tmp_path / "reference", synthetic_dir)
    collect(reference.data_prep, show_progress=False)
    clips = manifest_ids(tmp_path / "reference")
    qa(reference, engine=ScriptedEngine(processor.tokenizer, qa_reply(clips)), show_progress=False)
    expected = read_out(tmp_path / "reference", "qa")

    work = tmp_path / "work"
    recipe = recipe_for(work, synthetic_dir)
    collect(recipe.data_prep, show_progress=False)
    dying = ScriptedEngine(processor.tokenizer, qa_reply(clips), die_after=8)
    with pytest.raises(Killed):
        qa(recipe, engine=dying, show_progress=False)
    assert not stage_paths(work, "qa")["output"].exists()
    journaled = [json.loads(line)["id"] for line in
                 (stage_paths(work, "qa")["parts"] / "shard-00000-of-00001.jsonl").read_text().splitlines()]
    assert journaled == clips[:3]  # the first batch of 3 clips (6 requests) is on disk; the second died

    resumed = ScriptedEngine(processor.tokenizer, qa_reply(clips))
    report = qa(recipe, engine=resumed, show_progress=False)
    asked = {r.id.rpartition("#")[0] for r in resumed.requests}
    assert asked == set(clips[3:])  # nothing journaled is asked again; everything else is
    assert len(resumed.requests) == 6  # clips 3..7: one retry for clip 3
    output = read_out(work, "qa")
    assert output == expected and len({r["id"] for r in output}) == len(output)
    assert report["in"] == 8 and report["out"] == 9 and report["counts"] == read_out_report(tmp_path / "reference")["counts"]

    again = ScriptedEngine(processor.tokenizer, qa_reply(clips))
    qa(recipe, engine=again, show_progress=False)
    assert again.requests == [] and read_out(work, "qa") == expected  # a finished stage asks nothing


def read_out_report(work: Path) -> dict:
    return json.loads(stage_paths(work, "qa")["report"].read_text())


def test_contamination_guard_drops_generated_mmar_questions(tmp_path, synthetic_dir, processor, mmar_meta):
    mmar_question = next(r["question"] for _, r in read_jsonl(mmar_meta) if r.get("question"))
    variant = "  " + mmar_question.upper().replace(" ", "  ") + "?!"
    assert variant != mmar_question and normalise_question(variant) == normalise_question(mmar_question)
    work = tmp_path / "work"
    recipe = recipe_for(work, synthetic_dir, 3, f"data_prep.mmar_meta={mmar_meta}")
    collect(recipe.data_prep, show_progress=False)
    clips = manifest_ids(work)
    taken = dict(question(9, 9), question=variant)
    replies = {clips[0]: good(taken, question(0, 0)), clips[1]: good(taken), clips[2]: good(question(2, 0))}
    report = qa(recipe, engine=ScriptedEngine(processor.tokenizer, lambda r, s: replies[r.id.rpartition("#")[0]]), show_progress=False)
    output = read_out(work, "qa")
    assert [q["question"] for q in output] == [question(0, 0)["question"], question(2, 0)["question"]]
    assert report["rejected"] == {"qa_mmar_overlap": 1} and report["counts"] == {"dropped_question:mmar_overlap": 2}
    assert report["guard"] == ["question", "youtube"]


@pytest.mark.parametrize("reply, kind", [
    ("", "empty"),
    ("Sure! " + good(question(0, 0)), "not_json"),
    (json.dumps(question(0, 0)), "not_a_list"),
    ("[]", "question_count"),
    (good(*(question(0, k) for k in range(4))), "question_count"),
    ('["How many?"]', "not_an_object"),
    ('[{"question": "Q?", "choices": ["a", "b"]}]', "missing_key"),
    (good(dict(question(0, 0), explanation="why")), "extra_key"),
    (good(dict(question(0, 0), question="  ")), "bad_question"),
    (good(dict(question(0, 0), choices=["one beep"], answer="one beep")), "bad_choices"),
    (good(dict(question(0, 0), choices=[str(i) for i in range(7)], answer="1")), "bad_choices"),
    (good(dict(question(0, 0), choices=["two beeps", "Two beeps "], answer="two beeps")), "duplicate_choices"),
    (good(dict(question(0, 0), answer="Two beeps")), "answer_not_in_choices"),
    ("```json\n" + good(question(0, 0)) + "\n``` and more", "not_json"),
])
def test_malformed_qa_replies_are_named(reply, kind):
    with pytest.raises(ReplyError) as err:
        parse_qa_reply(reply, max_questions=3)
    assert err.value.kind == kind


def test_well_formed_qa_replies_parse():
    items = [question(0, 0), question(0, 1, "one beep")]
    assert parse_qa_reply(good(*items), 3) == items
    assert parse_qa_reply("```json\n" + good(*items) + "\n```", 3) == items
    assert parse_qa_reply("<think>\nplanning [not json]\n</think>\n\n" + good(items[0]), 3) == items[:1]


def test_consistency_uses_the_shared_answer_parser():
    record = {"choices": ["a dog barking", "a cat meowing", "a bird singing"], "answer": "a dog barking", "cot_finished": True}

    def check(raw: str, finished: bool = True) -> str | None:
        return consistency({**record, "cot_raw": raw, "cot_finished": finished})[1]

    think = "<think>\nA low, repeated woof: a dog.\n</think>\n\n"
    assert check(think + "The answer is: **a dog barking**.") is None  # lead-in and markdown dropped
    assert check(think + "I hear a dog barking in the yard.") is None  # the choice inside a sentence
    assert check(think + "A barking dog, clearly.") is None  # the official scorer's token rule
    assert check(think + "B") == "answer_mismatch"  # letters map to choices
    assert check(think + "a cat meowing") == "answer_mismatch"
    assert check(think + "an animal") == "answer_unmatched"
    assert check(think + "a dog barking", finished=False) == "cot_truncated"
    assert check("<think>\nA low, repeated woof, so a dog barking") == "cot_truncated"  # no </think>
    assert check("<think>\n\n</think>\n\na dog barking") == "thinking_empty"
    assert check("<think>\n" + "woof " * 2100 + "\n</think>\n\na dog barking") == "thinking_too_long"  # not under 10,000 chars


@pytest.mark.parametrize("reply, verdict", [
    ('{"verdict": "pass", "reason": "grounded"}', ("pass", "grounded")),
    ('```json\n{"verdict": "Fail", "reason": " invents speech "}\n```', ("fail", "invents speech")),
    ('<think>\nhmm\n</think>\n{"reason": "", "verdict": "pass"}', ("pass", "")),
])
def test_judge_verdicts_parse(reply, verdict):
    assert parse_verdict(reply) == verdict


@pytest.mark.parametrize("reply, kind", [
    ("PASS", "not_json"),
    ('Verdict: {"verdict": "pass", "reason": "x"}', "not_json"),
    ('[{"verdict": "pass", "reason": "x"}]', "not_an_object"),
    ('{"verdict": "pass"}', "bad_keys"),
    ('{"verdict": "pass", "reason": "x", "score": 5}', "bad_keys"),
    ('{"verdict": "maybe", "reason": "x"}', "bad_verdict"),
    ('{"verdict": "pass", "reason": 3}', "bad_reason"),
])
def test_unparseable_judge_replies_are_named(reply, kind):
    with pytest.raises(ReplyError) as err:
        parse_verdict(reply)
    assert err.value.kind == kind


def test_seed_pool_is_valid_varied_and_not_mmar(mmar_meta, mmar_facts):
    pool = load_seed_pool(REPO / "data_prep" / "seed_questions.jsonl")
    assert len(pool) >= 40 and len({normalise_question(q["question"]) for q in pool}) == len(pool)
    index = ContaminationIndex.from_meta(mmar_meta)
    assert [q["question"] for q in pool if index.check(q)] == []
    # ... and against all 1,000 MMAR questions, as hashes of the guard's normalised text (tests/data/mmar_facts.json)
    from tools.mmar_sample import question_hash

    hashes = set(mmar_facts["question_hashes"])
    assert all(question_hash(r["question"]) in hashes for _, r in read_jsonl(mmar_meta))  # the same hashing as the table's
    assert [q["question"] for q in pool if question_hash(q["question"]) in hashes] == []
    raw = [r for _, r in read_jsonl(REPO / "data_prep" / "seed_questions.jsonl")]
    assert {r["domain"].split("-")[0] for r in raw} == {"sound", "speech", "music", "mix"}
    shots = pick_shots(pool, 20, 0, "clip-a", 0)
    assert len(shots) == 20 and shots == pick_shots(pool, 20, 0, "clip-a", 0) != pick_shots(pool, 20, 0, "clip-a", 1)
