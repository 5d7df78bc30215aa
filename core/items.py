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

from core.audio import AudioError, audio_samples, load_audio
from core.records import record_problem, shown_id

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

    def audio_samples(self, max_seconds: float | None = None) -> int:
        """Samples that `load_audio(max_seconds)` will return, read from the file header only (fast)."""
        try:
            return audio_samples(self.audio_path, max_seconds)
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
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            if raw.strip():
                yield lineno, parse_line(raw, f"{path}:{lineno}")


def parse_line(raw: bytes, where: str) -> dict:
    """One JSONL line (its bytes) as a JSON object; `where` ("file:line") names it in the error."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                        "re-save the file as UTF-8") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_item(obj: dict, where: str, audio_root: Path) -> Item:
    label = f"{where} (id={shown_id(obj.get('id'))})"
    if (problem := record_problem(obj)) is not None:
        raise DataError(f"{label}: {problem}")
    thinking = obj.get("thinking")
    if thinking is not None and not isinstance(thinking, str):
        raise DataError(f"{label}: thinking: expected a string, got {type(thinking).__name__}")
    return Item(
        id=obj["id"], audio_path=(audio_root / obj["audio_path"]).resolve(), question=obj["question"],
        choices=tuple(obj["choices"]), answer=obj["answer"], thinking=thinking, meta=obj, where=where,
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
