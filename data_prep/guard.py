"""Contamination guard: keep the MMAR test set out of the training data.

    index = ContaminationIndex.from_meta("MMAR-meta.jsonl", audio_root="data/mmar")  # audio optional
    overlaps = index.check(record)            # [] when clean, else e.g. ["question:<mmar id>"]
    python -m data_prep guard FILE.jsonl --meta MMAR-meta.jsonl [--audio-root data/mmar] [--out clean.jsonl]

A record overlaps MMAR when any of these match (each check runs when both sides have the data):
- question: the normalised question text (NFKC, lower case, punctuation dropped, whitespace
  collapsed) equals an MMAR question;
- audio: the content hash of the decoded clip equals an MMAR clip's. We hash the 16 kHz mono PCM
  from `core.audio.load_audio`, quantised to int16 (not the file bytes), so a copy of the same
  signal in another container, header or bit depth still matches; re-encoded, cut or mixed copies
  do not (this is an exact-duplicate check). Needs the MMAR audio: without it this check is off
  and the report says so.
- youtube: the record's YouTube segment (metadata youtube_id/start/end, as AudioSet and AudioCaps
  carry, or an MMAR-style url/timestamp) overlaps in time an MMAR clip cut from the same video.
  This one needs only the metadata, so it protects the collect stage even without the MMAR audio.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.audio import AudioError, load_audio
from core.items import read_jsonl

YOUTUBE_ID = re.compile(r"(?:[?&]v=|youtu\.be/|/shorts/|/embed/)([\w-]{11})")


def normalise_question(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s]|_", " ", text)
    return " ".join(text.split())


def audio_hash(path: str | Path) -> str:
    wave = load_audio(path)
    pcm = np.round(np.clip(wave, -1.0, 1.0) * 32767).astype("<i2")
    return hashlib.sha256(pcm.tobytes()).hexdigest()


def _seconds(clock: str) -> float:
    parts = [float(p) for p in clock.strip().split(":")]
    return sum(value * 60**power for power, value in enumerate(reversed(parts)))


def youtube_segment(record: dict) -> tuple[str, float, float] | None:
    """(video id, start, end) of a record cut from YouTube, or None; end is inf when unknown."""
    meta = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    if meta.get("youtube_id"):
        start = float(meta.get("start") or 0.0)
        return meta["youtube_id"], start, float(meta.get("end") or start + 10.0)
    match = YOUTUBE_ID.search(record.get("url") or "")
    if not match:
        return None
    try:
        start, end = (_seconds(t) for t in str(record.get("timestamp", "")).split(","))
    except ValueError:
        start, end = 0.0, float("inf")
    return match[1], start, end


@dataclass
class ContaminationIndex:
    questions: dict[str, str] = field(default_factory=dict)  # normalised question -> MMAR id
    audio: dict[str, str] = field(default_factory=dict)  # audio hash -> MMAR id
    segments: dict[str, list[tuple[float, float, str]]] = field(default_factory=dict)  # video -> (start, end, id)
    audio_missing: int = 0  # MMAR clips that were not found or not decodable
    _hash_cache: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_meta(cls, meta: str | Path, audio_root: str | Path | None = None) -> "ContaminationIndex":
        index = cls()
        for _, record in read_jsonl(meta):
            rid = str(record.get("id"))
            if record.get("question"):
                index.questions.setdefault(normalise_question(record["question"]), rid)
            if (segment := youtube_segment(record)) is not None:
                video, start, end = segment
                index.segments.setdefault(video, []).append((start, end, rid))
            if audio_root is not None and record.get("audio_path"):
                try:
                    index.audio.setdefault(audio_hash(Path(audio_root) / record["audio_path"]), rid)
                except AudioError:
                    index.audio_missing += 1
        return index

    @property
    def checks(self) -> list[str]:
        return [name for name, table in (("question", self.questions), ("audio", self.audio), ("youtube", self.segments)) if table]

    def record_hash(self, path: Path) -> str | None:
        key = str(path)
        if key not in self._hash_cache:
            try:
                self._hash_cache[key] = audio_hash(path)
            except AudioError:
                return None
        return self._hash_cache[key]

    def check(self, record: dict, audio_root: str | Path | None = None) -> list[str]:
        """"kind:mmar_id" for every overlap of the record with MMAR ([] when clean).

        `audio_path` is resolved against `audio_root` (absolute paths as they are); the audio
        check decodes the clip, so it only runs when the index holds MMAR audio hashes.
        """
        found = []
        question = record.get("question")
        if isinstance(question, str) and (hit := self.questions.get(normalise_question(question))):
            found.append(f"question:{hit}")
        if self.audio and record.get("audio_path"):
            path = Path(audio_root or ".") / record["audio_path"]
            if (digest := self.record_hash(path)) and (hit := self.audio.get(digest)):
                found.append(f"audio:{hit}")
        if (segment := youtube_segment(record)) is not None:
            video, start, end = segment
            for mmar_start, mmar_end, hit in self.segments.get(video, []):
                if start < mmar_end and mmar_start < end:
                    found.append(f"youtube:{hit}")
                    break
        return found


def guard_file(path: str | Path, index: ContaminationIndex, audio_root: str | Path | None = None,
               clean_out: str | Path | None = None) -> dict:
    """Check every record of a JSONL (manifest or SFT); optionally write the clean records."""
    path = Path(path)
    root = Path(audio_root) if audio_root is not None else path.parent
    flagged, total, kept = [], 0, []
    for lineno, record in read_jsonl(path):
        total += 1
        overlaps = index.check(record, root)
        if overlaps:
            flagged.append({"line": lineno, "id": record.get("id"), "overlaps": overlaps})
        elif clean_out is not None:
            kept.append(record)
    if clean_out is not None:
        Path(clean_out).parent.mkdir(parents=True, exist_ok=True)
        with Path(clean_out).open("w", encoding="utf-8") as out:
            out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
    by_kind: dict[str, int] = {}
    for item in flagged:
        for kind in {o.split(":", 1)[0] for o in item["overlaps"]}:
            by_kind[kind] = by_kind.get(kind, 0) + 1
    return {
        "file": str(path), "records": total, "flagged": len(flagged), "flagged_by_check": by_kind,
        "checks": index.checks, "mmar_audio_hashes": len(index.audio), "mmar_audio_missing": index.audio_missing,
        "audio_check": "on" if index.audio else "off: no MMAR audio hashes (pass --audio-root)", "overlaps": flagged,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep guard", description="Flag records that overlap the MMAR test set.")
    parser.add_argument("file", help="manifest or SFT JSONL")
    parser.add_argument("--meta", required=True, help="MMAR-meta.jsonl")
    parser.add_argument("--audio-root", help="folder of the MMAR audio (enables the audio-hash check)")
    parser.add_argument("--file-audio-root", help="folder the FILE's audio_path is relative to (default: its folder)")
    parser.add_argument("--out", help="write the records without overlaps here and exit 0 (flag instead of refuse)")
    args = parser.parse_args(argv)
    index = ContaminationIndex.from_meta(args.meta, args.audio_root)
    report = guard_file(args.file, index, args.file_audio_root, args.out)
    print(json.dumps({k: v for k, v in report.items() if k != "overlaps"}, indent=2))
    for item in report["overlaps"][:50]:
        print(f"{args.file}:{item['line']} (id={item['id']}): overlaps MMAR: {', '.join(item['overlaps'])}", file=sys.stderr)
    return 0 if args.out or not report["flagged"] else 1
