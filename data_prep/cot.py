"""Stage 3 of the Cogito-Pipe, cot: self-distillation of the Thinking model's reasoning.

    python -m data_prep cot RECIPE [--shard i/n] [dotted.key=value ...]    qa.jsonl -> cot.jsonl

The Thinking model (`model.path`, no adapter) answers every question exactly as at inference and
in training: the prompt is `core.qwen_omni.render_prompt` with `model.prompt_style`, holding the
audio, the question and the choices, never the gold answer. Decoding follows `data_prep.cot`.

Nothing is judged here: each question record gets the raw output and whether it ended by itself
(`cot_raw`, `cot_finished`, `cot_tokens`, `cot_model`); stage 4 (verify) splits it with the shared
parser and decides. Only questions whose clip cannot be decoded are rejected (`unreadable_clip`).
"""

from __future__ import annotations

from pathlib import Path

from core.qwen_omni import render_prompt
from core.recipe import Recipe
from data_prep.generation import AudioCache, EngineSlot, load_stage_engine, sampling_of
from data_prep.stage import finished_output, run_stage
from infer.engine import Engine, Request

STAGE = "cot"
INPUT = "qa"


class Distiller:
    """The batch function of the cot stage."""

    def __init__(self, recipe: Recipe, engine: EngineSlot):
        self.model = recipe.model.path
        self.prompt_style = recipe.model.prompt_style
        self.sampling = sampling_of(recipe.data_prep.cot)
        self.max_audio_seconds = recipe.data.max_audio_seconds
        self.engine = engine

    def __call__(self, questions: list[dict]) -> list[list[dict] | str]:
        audio = AudioCache(self.max_audio_seconds)
        readable = [q for q in questions if audio.get(q["audio_path"]) is not None]
        by_id = {}
        if readable:
            engine = self.engine()
            requests = [Request(q["id"], render_prompt(engine.tokenizer, q["question"], q["choices"], self.prompt_style),
                                audio.get(q["audio_path"])) for q in readable]
            by_id = {g.id: g for g in engine.generate(requests, self.sampling)}
        outcomes = []
        for question in questions:
            generation = by_id.get(question["id"])
            if generation is None:
                outcomes.append("unreadable_clip")
                continue
            outcomes.append([{
                **question, "cot_raw": generation.text, "cot_finished": generation.finished,
                "cot_tokens": generation.n_generated_tokens, "cot_model": self.model,
            }])
        return outcomes


def cot(recipe: Recipe, engine: Engine | None = None, show_progress: bool = True) -> dict:
    """Run (or resume) this process's shard of the cot stage; returns the stage report."""
    config = recipe.data_prep.cot
    work = Path(recipe.data_prep.work_dir)
    source = finished_output(work, INPUT)
    slot = EngineSlot(lambda: load_stage_engine(recipe, recipe.model.path, config, "model.path"), engine)
    extra = {"model": recipe.model.path, "prompt_style": recipe.model.prompt_style, "sampling": sampling_of(config).to_dict()}
    return run_stage(STAGE, Distiller(recipe, slot), source, work, recipe.data_prep.shard, batch_size=config.batch_size,
                     extra_report=extra, show_progress=show_progress)
