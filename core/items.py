"""Reading MMAR-schema JSONL: the real benchmark metadata, the synthetic set and SFT files.

Every problem is reported as `file:line (id=...): field: what is wrong`, so a bad record in a
file of half a million can be found and fixed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from core.audio import AudioError, load_audio

REQUIRED_FIELDS = ("id", "audio_path", "question", "choices", "answer")
MODALITIES = (
    "speech", "sound", "music", "mix-sound-speech", "mix-music-speech", "mix-sound-music", "mix-sound-music-speech",
)


class DataError(ValueError):
    """A record or file that cannot be used; the message names the file, the line/record and the field."""


@dataclass(frozen=True)
class Item:
    """One benchmark or training record. `meta` holds every field of the line, untouched."""

    id: str
    audio_path: Path  # resolved against the audio root
    question: str
    choices: tuple[str, ...]
    answer: str
    thinking: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    where: str = ""  # "file:line", for error messages

    def load_audio(self, max_seconds: float | None = None) -> np.ndarray:
        try:
            return load_audio(self.audio_path, max_seconds)
        except AudioError as err:
            raise DataError(f"{self.where} (id={self.id}): audio_path: {err}") from None

    @property
    def modality(self) -> str | None:
        return self.meta.get("modality")

    @property
    def category(self) -> str | None:
        return self.meta.get("category")

    @property
    def sub_category(self) -> str | None:
        return self.meta.get("sub-category")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line; a line that is not a JSON object is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if line.strip():
                yield lineno, parse_line(line, f"{path}:{lineno}")


def parse_line(line: str, where: str) -> dict:
    """One JSONL line as a JSON object; `where` ("file:line") names it in the error."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_item(obj: dict, where: str, audio_root: Path) -> Item:
    rid = obj.get("id")
    label = f"{where} (id={rid})"
    for name in REQUIRED_FIELDS:
        if name not in obj or obj[name] in (None, ""):
            raise DataError(f"{label}: {name}: missing")
    for name in ("id", "audio_path", "question", "answer"):
        if not isinstance(obj[name], str):
            raise DataError(f"{label}: {name}: expected a string, got {type(obj[name]).__name__}")
    choices = obj["choices"]
    # Strings, not necessarily non-empty: one real MMAR record carries an empty fifth choice.
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{label}: choices: expected a list of at least 2 strings, got {choices!r}")
    if len(set(choices)) != len(choices):
        raise DataError(f"{label}: choices: duplicate choice in {choices!r}")
    if obj["answer"] not in choices:
        raise DataError(f"{label}: answer: {obj['answer']!r} is not one of its choices {choices!r}")
    thinking = obj.get("thinking")
    if thinking is not None and not isinstance(thinking, str):
        raise DataError(f"{label}: thinking: expected a string, got {type(thinking).__name__}")
    return Item(
        id=obj["id"], audio_path=(audio_root / obj["audio_path"]).resolve(), question=obj["question"],
        choices=tuple(choices), answer=obj["answer"], thinking=thinking, meta=obj, where=where,
    )


def check_item(item: Item, check_audio: bool, require_thinking: bool) -> None:
    """What `load_items` asks of each record beyond its schema: a thinking for SFT, an audio file that exists."""
    if require_thinking and not item.thinking:
        raise DataError(f"{item.where} (id={item.id}): thinking: missing (required for SFT)")
    if check_audio and not item.audio_path.is_file():
        raise DataError(f"{item.where} (id={item.id}): audio_path: file not found: {item.audio_path}")


def load_items(
    path: str | Path,
    audio_root: str | Path | None = None,
    check_audio: bool = True,
    require_thinking: bool = False,
) -> list[Item]:
    """Load and validate every record of an MMAR-schema JSONL file.

    `audio_path` is resolved against `audio_root` (default: the file's folder). With `check_audio`,
    a record whose audio file does not exist is an error; decoding errors surface in `Item.load_audio`.
    """
    path = Path(path)
    root = Path(audio_root) if audio_root is not None else path.parent
    items: list[Item] = []
    first_line: dict[str, int] = {}
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        item = parse_item(obj, where, root)
        if item.id in first_line:
            raise DataError(f"{where} (id={item.id}): id: duplicate of line {first_line[item.id]}")
        first_line[item.id] = lineno
        check_item(item, check_audio, require_thinking)
        items.append(item)
    if not items:
        raise DataError(f"{path}: no records")
    return items
