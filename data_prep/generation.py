"""What the model stages of the Cogito-Pipe (qa, cot, verify) share: engines, sampling, prompts, JSON replies.

Every model call goes through `infer.engine`; a stage gets its engine from `EngineSlot`, which
loads it only when the first batch needs it (a resumed stage with nothing left to do, or one
whose input is empty, never loads a model) unless the caller hands in one (`engine=`: tests,
or a notebook reusing a loaded model).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from string import Template
from typing import Any, Callable

import numpy as np

from core.audio import AudioError, load_audio
from core.items import DataError
from core.qwen_omni import THINK_CLOSE
from core.recipe import PrepGeneration, Recipe
from infer.engine import Engine, SamplingConfig, load_engine

REPO = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^```(?:json)?[ \t]*\n(.*)\n```$", re.DOTALL)


class ReplyError(ValueError):
    """A model reply that does not have the required form; `kind` is a short label for the counts."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def resolve(path: str | Path) -> Path:
    """A recipe path as given (relative to the working directory), else relative to the repository."""
    path = Path(path)
    return path if path.is_absolute() or path.exists() else REPO / path


def read_template(path: str | Path, fields: set[str]) -> tuple[Template, str]:
    """A prompt file ($name placeholders, so JSON braces need no escaping) and its short sha256.

    Refuses a file that lacks one of `fields` or uses a placeholder the stage does not fill.
    """
    file = resolve(path)
    if not file.is_file():
        raise DataError(f"prompt file {path} not found")
    text = file.read_text(encoding="utf-8")
    template = Template(text)
    if not template.is_valid() or set(template.get_identifiers()) != fields:
        raise DataError(f"{file}: placeholders {sorted(template.get_identifiers())}, but this stage fills exactly "
                        f"{sorted(fields)} (write a literal $ as $$)")
    return template, hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def sampling_of(spec: PrepGeneration, **changes) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=spec.max_new_tokens, min_new_tokens=spec.min_new_tokens, do_sample=spec.do_sample,
        temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k, seed=spec.seed,
    ).replace(**changes)


def load_stage_engine(recipe: Recipe, model_path: str, spec: PrepGeneration, key: str) -> Engine:
    """The recipe's backend (infer.backend, dtype, vLLM settings) on another checkpoint, without adapter.

    `key` names the recipe field that chose the checkpoint, for the error when it is not there.
    """
    if not (Path(model_path) / "config.json").is_file():
        raise FileNotFoundError(f"{key}={model_path}: no checkpoint there (config.json missing)")
    stage = recipe.model_copy(deep=True)
    stage.model.path = model_path
    stage.infer.adapter = None
    stage.infer.batch_size = spec.batch_size
    return load_engine(stage)


class EngineSlot:
    """The stage's engine: the one handed in, else loaded on first use."""

    def __init__(self, load: Callable[[], Engine], engine: Engine | None = None):
        self._load = load
        self._engine = engine

    def __call__(self) -> Engine:
        if self._engine is None:
            self._engine = self._load()
        return self._engine


class AudioCache:
    """Clips decoded for one batch (a clip's questions share it), at the training length cap."""

    def __init__(self, max_seconds: float):
        self.max_seconds = max_seconds
        self._waves: dict[str, np.ndarray | None] = {}

    def get(self, path: str) -> np.ndarray | None:
        if path not in self._waves:
            try:
                self._waves[path] = load_audio(path, self.max_seconds)
            except AudioError:
                self._waves[path] = None
        return self._waves[path]


def reply_json(text: str) -> Any:
    """The JSON value of a reply: the text after any </think>, optionally inside one ```json fence.

    Nothing else is tolerated (no prose around it, no repair): a reply that is not exactly a JSON
    value is malformed.
    """
    body = text.rpartition(THINK_CLOSE)[2].strip()
    if fenced := _FENCE.match(body):
        body = fenced.group(1).strip()
    if not body:
        raise ReplyError("empty", "no reply text")
    try:
        return json.loads(body)
    except json.JSONDecodeError as err:
        raise ReplyError("not_json", f"{err.msg} at char {err.pos}") from None


def render_metadata(record: dict) -> str:
    """What is known about a clip, for the QA writer and the judge: domain, duration, annotations."""
    known = {"domain": record.get("domain"), "duration_seconds": record.get("duration"), **(record.get("metadata") or {})}
    return json.dumps({k: v for k, v in known.items() if v not in (None, "", [], {})}, ensure_ascii=False)
