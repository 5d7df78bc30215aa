"""Stage 2 of the Cogito-Pipe, qa: each clip of the manifest -> 1 to 3 multiple-choice questions.

    python -m data_prep qa RECIPE [--shard i/n] [dotted.key=value ...]    collect.jsonl -> qa.jsonl

An instruction model (`data_prep.qa.model`, Qwen3-Omni-Instruct by default) hears the clip and
reads its metadata and `n_shots` example questions drawn from the seed pool
(`data_prep.seed_questions`), with the prompt of `data_prep.qa.prompt`. Its reply must be exactly
a JSON list of {"question", "choices" (2-6 distinct strings), "answer" (one of the choices)}, at
most `max_questions` long. A malformed reply is asked again, with other example questions and
another sampling seed, up to `max_attempts` times; then the clip is dropped (`qa_malformed`).
Each malformed reply is counted by kind (`malformed_reply:not_json`, ...).

Questions equal to an MMAR question after normalisation (`data_prep.guard`, when
`data_prep.mmar_meta` is set) and repeats within a clip are dropped and counted; a clip left with
none is rejected (`qa_mmar_overlap`, ...). With `shuffle_choices` the choices are put in a seeded
random order, so the answer's position (models like to put it first) carries no signal.

A question record carries the clip's provenance forward for the later stages and the data card:
    {"id": "<clip id>-q0", "clip_id", "audio_path", "duration", "domain", "source", "licence",
     "metadata", "question", "choices", "answer", "qa_model", "qa_attempt"}
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from core.items import DataError, read_jsonl
from core.qwen_omni import render_chat
from core.recipe import PrepQAConfig, Recipe
from data_prep.generation import (
    AudioCache,
    EngineSlot,
    ReplyError,
    load_stage_engine,
    read_template,
    render_metadata,
    reply_json,
    resolve,
    sampling_of,
)
from data_prep.guard import ContaminationIndex, normalise_question
from data_prep.stage import Counted, finished_output, run_stage
from infer.engine import Engine, Request

STAGE = "qa"
INPUT = "collect"
MIN_CHOICES, MAX_CHOICES = 2, 6
QUESTION_KEYS = {"question", "choices", "answer"}


def load_seed_pool(path: str | Path) -> list[dict]:
    """The few-shot pool: JSONL of {"question", "choices", "answer", ...}; a bad line is an error."""
    pool = []
    for lineno, record in read_jsonl(resolve(path)):
        try:
            pool.append(check_question(record, extra_keys_ok=True))
        except ReplyError as err:
            raise DataError(f"{path}:{lineno}: {err}") from None
    if not pool:
        raise DataError(f"{path}: the seed-question pool is empty")
    return pool


def check_question(item: object, extra_keys_ok: bool = False) -> dict:
    """{"question", "choices", "answer"} with 2-6 distinct non-empty choices and the answer among them."""
    if not isinstance(item, dict):
        raise ReplyError("not_an_object", f"expected an object, got {type(item).__name__}")
    if missing := QUESTION_KEYS - item.keys():
        raise ReplyError("missing_key", f"missing {sorted(missing)}")
    if not extra_keys_ok and (extra := item.keys() - QUESTION_KEYS):
        raise ReplyError("extra_key", f"unexpected {sorted(extra)}")
    question, choices, answer = item["question"], item["choices"], item["answer"]
    if not isinstance(question, str) or not question.strip():
        raise ReplyError("bad_question", "question: expected a non-empty string")
    if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
        raise ReplyError("bad_choices", "choices: expected a list of non-empty strings")
    if not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        raise ReplyError("bad_choices", f"choices: {len(choices)}, expected {MIN_CHOICES} to {MAX_CHOICES}")
    if len({c.strip().casefold() for c in choices}) != len(choices):
        raise ReplyError("duplicate_choices", f"choices: not distinct: {choices}")
    if not isinstance(answer, str) or answer not in choices:
        raise ReplyError("answer_not_in_choices", f"answer {answer!r} is not one of {choices}")
    return {"question": question.strip(), "choices": [c.strip() for c in choices], "answer": answer.strip()}


def parse_qa_reply(text: str, max_questions: int) -> list[dict]:
    """The questions of one reply, or ReplyError: a JSON list of 1..max_questions valid questions."""
    value = reply_json(text)
    if not isinstance(value, list):
        raise ReplyError("not_a_list", f"expected a JSON list, got {type(value).__name__}")
    if not 1 <= len(value) <= max_questions:
        raise ReplyError("question_count", f"{len(value)} questions, expected 1 to {max_questions}")
    return [check_question(item) for item in value]


def pick_shots(pool: list[dict], n: int, seed: int, clip_id: str, attempt: int) -> list[dict]:
    """Deterministic per clip and attempt; independent of shard and batch."""
    return random.Random(f"{seed}:{clip_id}:{attempt}").sample(pool, min(n, len(pool)))


class QuestionWriter:
    """The batch function of the qa stage (see the module docstring)."""

    def __init__(self, recipe: Recipe, engine: EngineSlot, guard: ContaminationIndex | None):
        self.config: PrepQAConfig = recipe.data_prep.qa
        self.seed = recipe.data_prep.seed
        self.engine = engine
        self.guard = guard
        self.pool = load_seed_pool(recipe.data_prep.seed_questions)
        self.template, self.prompt_sha = read_template(self.config.prompt, {"metadata", "max_questions", "examples"})
        self.max_audio_seconds = recipe.data.max_audio_seconds

    def prompt(self, tokenizer, clip: dict, attempt: int) -> str:
        shots = pick_shots(self.pool, self.config.n_shots, self.seed, clip["id"], attempt)
        examples = "\n".join(json.dumps({k: s[k] for k in ("question", "choices", "answer")}, ensure_ascii=False) for s in shots)
        text = self.template.substitute(
            metadata=render_metadata(clip), max_questions=self.config.max_questions, examples=examples or "(none)",
        )
        return render_chat(tokenizer, text, with_audio=True)

    def __call__(self, clips: list[dict]) -> list[Counted | str]:
        audio = AudioCache(self.max_audio_seconds)
        outcomes: dict[str, Counted | str] = {}
        counts = {clip["id"]: Counter() for clip in clips}
        pending = []
        for clip in clips:
            if audio.get(clip["audio_path"]) is None:
                outcomes[clip["id"]] = "unreadable_clip"
            else:
                pending.append(clip)
        for attempt in range(self.config.max_attempts):
            if not pending:
                break
            engine = self.engine()
            requests = [Request(f"{clip['id']}#{attempt}", self.prompt(engine.tokenizer, clip, attempt), audio.get(clip["audio_path"]))
                        for clip in pending]
            generations = engine.generate(requests, sampling_of(self.config, seed=self.config.seed + attempt))
            retry = []
            for clip, generation in zip(pending, generations):
                try:
                    if not generation.finished:
                        raise ReplyError("cut_by_budget", "max_new_tokens reached")
                    questions = parse_qa_reply(generation.text, self.config.max_questions)
                except ReplyError as err:
                    counts[clip["id"]][f"malformed_reply:{err.kind}"] += 1
                    retry.append(clip)
                    continue
                outcome = self.records(clip, questions, attempt, counts[clip["id"]])
                outcomes[clip["id"]] = Counted(outcome, counts[clip["id"]])
            pending = retry
        for clip in pending:
            outcomes[clip["id"]] = Counted("qa_malformed", counts[clip["id"]])
        return [outcomes[clip["id"]] for clip in clips]

    def records(self, clip: dict, questions: list[dict], attempt: int, counts: Counter) -> list[dict] | str:
        """Question records of one clip, without repeats and MMAR overlaps (those are counted)."""
        kept, seen, reasons = [], set(), []
        for item in questions:
            key = normalise_question(item["question"])
            if key in seen:
                reasons.append("duplicate_question")
            elif self.guard is not None and self.guard.check({"question": item["question"]}):
                reasons.append("mmar_overlap")
            else:
                seen.add(key)
                kept.append(item)
        counts.update(f"dropped_question:{r}" for r in reasons)
        if not kept:  # a repeat needs a kept question before it: all of these overlapped MMAR
            return "qa_mmar_overlap"
        records = []
        for k, item in enumerate(kept):
            choices = list(item["choices"])
            if self.config.shuffle_choices:
                random.Random(f"{self.seed}:{clip['id']}:q{k}").shuffle(choices)
            records.append({
                "id": f"{clip['id']}-q{k}", "clip_id": clip["id"], "audio_path": clip["audio_path"],
                "duration": clip.get("duration"), "domain": clip.get("domain"), "source": clip.get("source"),
                "licence": clip.get("licence"), "licence_id": clip.get("licence_id"), "metadata": clip.get("metadata") or {},
                "question": item["question"], "choices": choices, "answer": item["answer"],
                "qa_model": self.config.model, "qa_attempt": attempt,
            })
        return records


def question_guard(recipe: Recipe) -> ContaminationIndex | None:
    """MMAR's questions only: the clips themselves were checked at collect."""
    meta = recipe.data_prep.mmar_meta
    if meta is None:
        return None
    if not Path(meta).is_file():
        raise DataError(f"data_prep.mmar_meta: {meta} not found (set it to null to run without the guard)")
    return ContaminationIndex.from_meta(meta)


def qa(recipe: Recipe, engine: Engine | None = None, show_progress: bool = True) -> dict:
    """Run (or resume) this process's shard of the qa stage; returns the stage report."""
    config = recipe.data_prep.qa
    work = Path(recipe.data_prep.work_dir)
    source = finished_output(work, INPUT)
    guard = question_guard(recipe)
    slot = EngineSlot(lambda: load_stage_engine(recipe, config.model, config, "data_prep.qa.model"), engine)
    writer = QuestionWriter(recipe, slot, guard)
    extra = {
        "model": config.model, "prompt": config.prompt, "prompt_sha256": writer.prompt_sha,
        "seed_questions": recipe.data_prep.seed_questions, "seed_pool_size": len(writer.pool), "n_shots": config.n_shots,
        "max_questions": config.max_questions, "max_attempts": config.max_attempts,
        "sampling": sampling_of(config).to_dict(), "guard": guard.checks if guard else [],
    }
    return run_stage(STAGE, writer, source, work, recipe.data_prep.shard, batch_size=config.batch_size,
                     extra_report=extra, show_progress=show_progress)
