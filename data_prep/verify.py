"""Stage 4 of the Cogito-Pipe, verify: keep only reasoning that is complete, right and sound.

    python -m data_prep verify RECIPE [--shard i/n] [dotted.key=value ...]    cot.jsonl -> verify.jsonl

`verify.jsonl` is the SFT file: `core.items.load_items(..., require_thinking=True)` and
`train/data.py` read it as it is (point `data.train` at it). Each distilled answer passes, in order:

1. QA consistency, by string matching only: the raw output is split by the shared parser
   (`infer.parse.parse_output`, the rule inference uses to extract answers). Rejected:
   `cot_truncated` (cut by the token budget, or no `</think>`), `thinking_empty`,
   `thinking_too_long` (not under the 10,000-character submission limit),
   `answer_unmatched` (the answer names no single choice), `answer_mismatch` (another choice).
2. The LLM judge (`data_prep.judge.model`, text only, prompt `data_prep.judge.prompt`) reads the
   clip's metadata, the question, the choices, the gold answer and the reasoning, and must reply
   exactly {"verdict": "pass"|"fail", "reason": "..."}. Rejected: `judge_fail`, and
   `judge_unparseable` (any other reply; its kind is counted as `judge_unparseable:<kind>`).

An SFT record:
    {"id", "audio_path", "question", "choices", "answer", "thinking", "source", "domain", "licence",
     "duration", "clip_id", "qa_model", "cot_model", "judge_model", "judge_reason", "answer_rule"}
"""

from __future__ import annotations

from pathlib import Path

from core.qwen_omni import render_chat
from core.recipe import Recipe
from data_prep.generation import (
    EngineSlot,
    ReplyError,
    load_stage_engine,
    read_template,
    render_metadata,
    reply_json,
    sampling_of,
)
from data_prep.stage import Counted, finished_output, run_stage
from infer.engine import Engine, Request
from infer.parse import Parsed, parse_output

STAGE = "verify"
INPUT = "cot"
VERDICTS = ("pass", "fail")
PROVENANCE = ("source", "domain", "licence", "licence_id", "duration", "clip_id", "qa_model", "cot_model")


def consistency(record: dict) -> tuple[Parsed, str | None]:
    """The parsed output and the reason it fails the QA-consistency check (None: it passes)."""
    parsed = parse_output(record["cot_raw"], record["choices"])
    if not record["cot_finished"] or parsed.truncated:
        return parsed, "cot_truncated"
    if not parsed.thinking:
        return parsed, "thinking_empty"
    if parsed.thinking_cut:
        return parsed, "thinking_too_long"
    if not parsed.matched:
        return parsed, "answer_unmatched"
    if parsed.answer != record["answer"]:
        return parsed, "answer_mismatch"
    return parsed, None


def parse_verdict(text: str) -> tuple[str, str]:
    """(verdict, reason) of a judge reply that is exactly {"verdict": "pass"|"fail", "reason": str}."""
    value = reply_json(text)
    if not isinstance(value, dict):
        raise ReplyError("not_an_object", f"expected a JSON object, got {type(value).__name__}")
    if set(value) != {"verdict", "reason"}:
        raise ReplyError("bad_keys", f"keys {sorted(value)}, expected ['reason', 'verdict']")
    verdict, reason = value["verdict"], value["reason"]
    if not isinstance(verdict, str) or verdict.strip().lower() not in VERDICTS:
        raise ReplyError("bad_verdict", f"verdict {verdict!r}, expected one of {VERDICTS}")
    if not isinstance(reason, str):
        raise ReplyError("bad_reason", "reason: expected a string")
    return verdict.strip().lower(), reason.strip()


class Verifier:
    """The batch function of the verify stage (see the module docstring)."""

    def __init__(self, recipe: Recipe, engine: EngineSlot):
        self.config = recipe.data_prep.judge
        self.engine = engine
        self.template, self.prompt_sha = read_template(self.config.prompt, {"metadata", "question", "choices", "answer", "thinking"})

    def judge_prompt(self, tokenizer, record: dict, thinking: str) -> str:
        text = self.template.substitute(
            metadata=render_metadata(record), question=record["question"], choices="\n".join(record["choices"]),
            answer=record["answer"], thinking=thinking,
        )
        return render_chat(tokenizer, text, with_audio=False)

    def __call__(self, records: list[dict]) -> list[Counted | str]:
        outcomes: dict[str, Counted | str] = {}
        consistent: list[tuple[dict, Parsed]] = []
        for record in records:
            parsed, reason = consistency(record)
            if reason is None:
                consistent.append((record, parsed))
            else:
                outcomes[record["id"]] = reason
        if consistent:
            engine = self.engine()
            requests = [Request(r["id"], self.judge_prompt(engine.tokenizer, r, p.thinking)) for r, p in consistent]
            generations = engine.generate(requests, sampling_of(self.config))
            for (record, parsed), generation in zip(consistent, generations):
                try:
                    if not generation.finished:
                        raise ReplyError("cut_by_budget", "max_new_tokens reached")
                    verdict, reason = parse_verdict(generation.text)
                except ReplyError as err:
                    outcomes[record["id"]] = Counted("judge_unparseable", {f"judge_unparseable:{err.kind}": 1})
                    continue
                outcomes[record["id"]] = "judge_fail" if verdict == "fail" else [self.sft_record(record, parsed, reason)]
        return [outcomes[record["id"]] for record in records]

    def sft_record(self, record: dict, parsed: Parsed, judge_reason: str) -> dict:
        return {
            "id": record["id"], "audio_path": record["audio_path"], "question": record["question"],
            "choices": record["choices"], "answer": record["answer"], "thinking": parsed.thinking,
            **{k: record.get(k) for k in PROVENANCE}, "judge_model": self.config.model,
            "judge_reason": judge_reason, "answer_rule": parsed.rule,
        }


def verify(recipe: Recipe, engine: Engine | None = None, show_progress: bool = True) -> dict:
    """Run (or resume) this process's shard of the verify stage; returns the stage report."""
    config = recipe.data_prep.judge
    work = Path(recipe.data_prep.work_dir)
    source = finished_output(work, INPUT)
    slot = EngineSlot(lambda: load_stage_engine(recipe, config.model, config, "data_prep.judge.model"), engine)
    verifier = Verifier(recipe, slot)
    extra = {"judge_model": config.model, "prompt": config.prompt, "prompt_sha256": verifier.prompt_sha,
             "sampling": sampling_of(config).to_dict()}
    return run_stage(STAGE, verifier, source, work, recipe.data_prep.shard, batch_size=config.batch_size,
                     extra_report=extra, show_progress=show_progress)
