"""Dataset adapters of the Cogito-Pipe: each reads a LOCAL copy of one raw dataset's official release.

An adapter is a generator `scan(root, **options)` registered under a name. It reads only the
dataset's metadata files and the folder listing (no audio decoding) and yields a `Candidate` per
clip, or a `Skip` with a reason for a clip it cannot use (most often `missing_clip`). The collect
stage (`data_prep.collect`) samples the mixture from the candidates, probes each clip with
`soundfile.info` for its duration and writes the manifest.

Every adapter's docstring says where to download the data and the folder layout it expects;
tests/fixtures/sources/README.md names the public source of each layout detail the tests mirror.
Licences are our reading of each official release; check them before publishing a data set,
and override them per source in the recipe (`licence:`) where needed. `licence_id` maps a licence
text to the id the collect stage's licence gate checks (`data_prep.licences`).
Rows that cannot be used are yielded as a `Skip` with a reason, never dropped silently; the reasons
in BAD_ROW_REASONS are damaged metadata and count against `data_prep.max_bad_rows`.
Audio is decoded by soundfile (libsndfile >= 1.1 reads mp3, so FMA and Common Voice mp3s work);
containers it cannot read (MELD's mp4) must be converted to wav first, as that adapter says.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Union

from core.items import DataError

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a")  # m4a: listed, but soundfile cannot read it (probe)
DOMAINS = ("sound", "speech", "music")
BAD_ROW_REASONS = ("bad_metadata", "truncated_row", "undecodable_text")  # damaged metadata: data_prep.max_bad_rows


@dataclass(frozen=True)
class Candidate:
    key: str  # unique within the dataset; the manifest id is "<dataset>-<key>"
    audio_path: Path
    metadata: dict[str, Any]
    domain: str | None = None  # None: the adapter's default domain
    licence: str | None = None  # None: the adapter's licence (per-clip licences where the release has them)


@dataclass(frozen=True)
class Skip:
    reason: str  # counted in the collect report, e.g. missing_clip
    where: str  # file:line or key, for the log


Scan = Callable[..., Iterator[Union[Candidate, Skip]]]


@dataclass(frozen=True)
class Adapter:
    name: str
    domain: str
    licence: str  # the release's licence, as the card shows it
    licence_id: str | None  # the id the licence gate checks for clips without their own licence; None: unknown
    scan: Scan = field(repr=False)


ADAPTERS: dict[str, Adapter] = {}


def register(name: str, domain: str, licence: str, licence_id: str | None) -> Callable[[Scan], Scan]:
    def wrap(scan: Scan) -> Scan:
        ADAPTERS[name] = Adapter(name, domain, licence, licence_id, scan)
        return scan

    return wrap


# ---------------------------------------------------------------------------------------------
# Licence ids

# Named (non-SPDX) licence ids the adapters use; any SPDX id in SPDX_IDS or a Creative Commons id is accepted too.
NAMED_LICENCES = {
    "YouTube-ToS": "YouTube audio: the uploaders' rights under YouTube's terms of service (AudioSet, AudioCaps, MusicCaps)",
}
SPDX_IDS = ("MIT", "Apache-2.0", "GPL-3.0-only", "GPL-3.0-or-later", "CC0-1.0", "PDDL-1.0")
_CC_URL = re.compile(r"creativecommons\.org/licenses/(?P<kind>by(?:-nc)?(?:-nd|-sa)?)/(?P<version>\d\.\d)")
_CC_SHORT = re.compile(r"\bcc[ -]?(?P<kind>by(?:[ -]nc)?(?:[ -](?:nd|sa))?)[ -]+(?P<version>\d\.\d)\b")
_CC_ID = re.compile(r"^CC-BY(-NC)?(-ND|-SA)?-\d\.\d$")


def licence_id(text: str | None) -> str | None:
    """The SPDX id (or named id of NAMED_LICENCES) of a licence text as releases write it, None when unknown.

    Reads Creative Commons licences as URLs (Freesound/Clotho: http://creativecommons.org/licenses/by-nc/3.0/),
    short forms ("CC BY-NC 4.0") and titles (FMA: "Attribution-NonCommercial-ShareAlike 3.0 International");
    a Creative Commons licence without a version is unknown (the terms differ between versions).
    """
    if not text:
        return None
    text = text.strip()
    if text in SPDX_IDS or text in NAMED_LICENCES or _CC_ID.match(text):
        return text
    low = text.lower()
    if "publicdomain/zero" in low or re.search(r"\bcc0\b|creative commons 0|cc-zero", low):
        return "CC0-1.0"
    if match := _CC_URL.search(low) or _CC_SHORT.search(low):
        return f"CC-{match['kind'].replace(' ', '-').upper()}-{match['version']}"
    version = re.search(r"\b(\d\.\d)\b", low)
    if "attribution" in low and version:
        words = re.sub(r"[^a-z]", "", low)
        kind = "BY" + ("-NC" if "noncommercial" in words else "") + \
            ("-ND" if "noderiv" in words else "-SA" if "sharealike" in words else "")
        return f"CC-{kind}-{version[1]}"
    return None


def get_adapter(name: str) -> Adapter:
    if name not in ADAPTERS:
        raise DataError(f"unknown dataset adapter {name!r}; known: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name]


# ---------------------------------------------------------------------------------------------
# Helpers shared by the adapters


def row_problem(values: Iterable[Any]) -> str | None:
    """Why a metadata row cannot be trusted: bytes that did not decode, or a cut-short row (None values)."""
    values = list(values)
    if any(v is None for v in values):
        return "truncated_row"
    if any(isinstance(v, str) and "\ufffd" in v for v in values):
        return "undecodable_text"
    return None


def read_table(path: Path, required: Iterable[str] = (), encoding: str = "utf-8-sig",
               **csv_options) -> Iterator[tuple[str, dict[str, str]] | Skip]:
    """("file:line", row) for each row of a CSV/TSV with a header, or a Skip for a row with too few or too
    many fields (truncated_row) or bytes not in `encoding` (undecodable_text); a missing column is an error."""
    if not path.is_file():
        raise DataError(f"{path}: metadata file not found")
    with path.open(encoding=encoding, errors="replace", newline="") as handle:
        reader = csv.DictReader(handle, **csv_options)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            problem = "truncated_row" if None in row else row_problem([*row.values(), *row])  # None key: extra fields
            if problem:
                yield Skip(problem, where)
            else:
                yield where, row


def rows_of(entries: Iterable[tuple[str, dict] | Skip], skips: list[Skip]) -> Iterator[tuple[str, dict]]:
    """The good rows of `read_table`; its Skips go to `skips`, for the adapter to yield."""
    for entry in entries:
        if isinstance(entry, Skip):
            skips.append(entry)
        else:
            yield entry


class AudioIndex:
    """Audio files under a folder by file stem: one listing instead of a stat per metadata row."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.by_stem: dict[str, Path] = {}
        if folder.is_dir():
            for path in sorted(folder.rglob("*")):
                if path.suffix.lower() in AUDIO_EXTENSIONS:
                    self.by_stem.setdefault(path.stem, path)

    def find(self, *stems: str) -> Path | None:
        return next((self.by_stem[s] for s in stems if s in self.by_stem), None)


def pick_splits(root: Path, pattern: str, splits: Iterable[str] | None, known: Iterable[str]) -> list[tuple[str, Path]]:
    """(split, metadata file) for the requested splits, or for every known split whose file exists."""
    wanted = list(splits) if splits is not None else [s for s in known if (root / pattern.format(split=s)).is_file()]
    if not wanted:
        raise DataError(f"{root}: none of {[pattern.format(split=s) for s in known]} found")
    return [(s, root / pattern.format(split=s)) for s in wanted]


def segment_stems(ytid: str, start: float, end: float) -> tuple[str, ...]:
    """File names the common YouTube-segment downloaders give a clip; `audioset-download` (PyPI) writes
    `{ytid}_{start}-{end}` with the CSV's seconds as Python floats (`_30.0-40.0`)."""
    return (
        f"Y{ytid}_{start:.3f}_{end:.3f}", f"{ytid}_{start:.3f}_{end:.3f}", f"{ytid}_{int(start)}_{int(end)}",
        f"{ytid}_{float(start)}-{float(end)}", f"{ytid}_{int(start)}", f"{ytid}_{start:.3f}", f"Y{ytid}", ytid,
    )


def clip_or_skip(path: Path | None, where: str) -> Skip | None:
    return Skip("missing_clip", where) if path is None or not path.is_file() else None


# ---------------------------------------------------------------------------------------------
# Sound


AUDIOSET_SPEECH, AUDIOSET_MUSIC = "/m/09x0r", "/m/04rlf"


def _audioset_label_names(root: Path) -> dict[str, str]:
    ontology, indices = root / "ontology.json", root / "class_labels_indices.csv"
    if ontology.is_file():
        return {entry["id"]: entry["name"] for entry in json.loads(ontology.read_text(encoding="utf-8"))}
    if indices.is_file():
        return {row["mid"]: row["display_name"] for _, row in rows_of(read_table(indices, ("mid", "display_name")), [])}
    raise DataError(f"{root}: neither ontology.json nor class_labels_indices.csv found (label names)")


@register("audioset", "sound", "CC BY 4.0 (labels, Google); audio: YouTube, the uploaders' terms", "YouTube-ToS")
def audioset(root: Path, splits: Iterable[str] | None = None, audio_dir: str = "audio") -> Iterator[Candidate | Skip]:
    """AudioSet (Gemmeke et al. 2017), 10 s YouTube segments with sound-event labels.

    Download: https://research.google.com/audioset/download.html (segment CSVs) and
    https://github.com/audioset/ontology (ontology.json). The audio is not distributed: fetch the
    segments yourself into `audio/`, e.g. with `audioset-download` (PyPI; github.com/MorenoLaQuatra/audioset-download),
    which writes <root>/<first label's display name>/<YTID>_<start>-<end>.<ext> (seconds as floats, `_30.0-40.0`;
    .ogg by default, or .wav/.flac/.mp3/.opus/.m4a; copies per further label unless copy_and_replicate=False:
    identical copies are removed by collect's dedup). soundfile reads ogg/opus/flac/wav/mp3, not m4a (convert it).
    Layout:
        root/balanced_train_segments.csv, eval_segments.csv, unbalanced_train_segments.csv
            ("# ..." comment lines, then rows `YTID, start_seconds, end_seconds, "mid,mid"`)
        root/ontology.json             (or class_labels_indices.csv: index,mid,display_name)
        root/audio/**/<clip>.{wav,flac,mp3,ogg,opus}, any subfolders, named Y<YTID>_<start>_<end>,
            <YTID>_<start>_<end>, <YTID>_<start>-<end> (audioset-download), <YTID>_<start> or <YTID>
            (start/end as in the CSV, or whole seconds)
    Domain: speech when labelled Speech and not Music, music when Music and not Speech, else sound.
    """
    names = _audioset_label_names(root)
    index = AudioIndex(root / audio_dir)
    for split, path in pick_splits(root, "{split}_segments.csv", splits, ("balanced_train", "eval", "unbalanced_train")):
        with path.open(encoding="utf-8") as handle:
            for lineno, row in enumerate(csv.reader(handle, skipinitialspace=True), 1):
                if not row or row[0].startswith("#"):
                    continue
                where = f"{path}:{lineno}"
                try:
                    ytid, start, end, labels = row[0], float(row[1]), float(row[2]), row[3]
                except (IndexError, ValueError):
                    yield Skip("bad_metadata", where)
                    continue
                label_ids = [m.strip() for m in labels.split(",") if m.strip()]
                clip = index.find(*segment_stems(ytid, start, end))
                if skip := clip_or_skip(clip, where):
                    yield skip
                    continue
                speech, music = AUDIOSET_SPEECH in label_ids, AUDIOSET_MUSIC in label_ids
                domain = "speech" if speech and not music else "music" if music and not speech else "sound"
                yield Candidate(
                    key=f"{ytid}_{int(start)}", audio_path=clip, domain=domain,
                    metadata={"labels": [names.get(m, m) for m in label_ids], "label_ids": label_ids,
                              "youtube_id": ytid, "start": start, "end": end, "split": split},
                )


@register("clotho", "sound", "Clotho (Tampere University, see the Zenodo record); audio: Freesound, per-clip CC licences", None)
def clotho(root: Path, splits: Iterable[str] | None = None, metadata_encoding: str = "iso-8859-1") -> Iterator[Candidate | Skip]:
    """Clotho v2 (Drossos et al. 2020): 15-30 s Freesound clips with five captions each.

    Download: https://zenodo.org/records/4783391 (clotho_audio_{split}.7z, clotho_captions_{split}.csv,
    clotho_metadata_{split}.csv).
    Layout:
        root/clotho_captions_{split}.csv   file_name, caption_1 .. caption_5
        root/clotho_metadata_{split}.csv   optional: file_name, keywords, sound_id, ..., license
                                           (ISO-8859-1 in v2 and v2.1, as aac-datasets reads it; UTF-8 in v1:
                                           metadata_encoding: utf-8-sig)
        root/{split}/<file_name>           the extracted 7z (split: development, validation, evaluation)
    The per-clip Freesound licence from the metadata file is the clip's licence when present; a clip
    without one has no known licence (the licence gate stops or drops it).
    """
    skips: list[Skip] = []
    for split, path in pick_splits(root, "clotho_captions_{split}.csv", splits, ("development", "validation", "evaluation")):
        extra_path = root / f"clotho_metadata_{split}.csv"
        extra = ({row["file_name"]: row for _, row in rows_of(read_table(extra_path, ("file_name",), encoding=metadata_encoding), skips)}
                 if extra_path.is_file() else {})
        for where, row in rows_of(read_table(path, ("file_name", "caption_1")), skips):
            name = row["file_name"]
            clip = root / split / name
            if skip := clip_or_skip(clip, where):
                yield skip
                continue
            more = extra.get(name, {})
            metadata = {"captions": [row[c] for c in sorted(row) if c.startswith("caption_") and row[c]], "split": split}
            if more.get("keywords"):
                metadata["keywords"] = [k for k in more["keywords"].split(";") if k]
            if more.get("sound_id"):
                metadata["freesound_id"] = more["sound_id"]
            yield Candidate(key=f"{split}-{Path(name).stem}", audio_path=clip, metadata=metadata, licence=more.get("license") or None)
    yield from skips


@register("audiocaps", "sound", "MIT (AudioCaps captions); audio: YouTube, the uploaders' terms", "YouTube-ToS")
def audiocaps(root: Path, splits: Iterable[str] | None = None, audio_dir: str = "audio") -> Iterator[Candidate | Skip]:
    """AudioCaps (Kim et al. 2019): captions for 10 s AudioSet segments.

    Download: https://github.com/cdjkim/audiocaps (dataset/{train,val,test}.csv); fetch the
    segments yourself (the repository links downloaders) into `audio/`.
    Layout:
        root/{train,val,test}.csv   audiocap_id, youtube_id, start_time, caption (val/test: 5 rows a clip)
        root/audio/**/<clip>.{wav,flac,mp3,ogg}, named like the AudioSet clips (Y<YTID>_<start>_<end>,
            <YTID>_<start>, <YTID>, ...), or <audiocap_id>
    Rows of one (youtube_id, start_time) become one clip with all its captions.
    """
    index = AudioIndex(root / audio_dir)
    skips: list[Skip] = []
    for split, path in pick_splits(root, "{split}.csv", splits, ("train", "val", "test")):
        clips: dict[tuple[str, float], dict] = {}
        for where, row in rows_of(read_table(path, ("audiocap_id", "youtube_id", "start_time", "caption")), skips):
            try:
                key = (row["youtube_id"], float(row["start_time"]))
            except ValueError:
                yield Skip("bad_metadata", where)
                continue
            entry = clips.setdefault(key, {"where": where, "captions": [], "audiocap_ids": []})
            entry["captions"].append(row["caption"])
            entry["audiocap_ids"].append(row["audiocap_id"])
        for (ytid, start), entry in clips.items():
            clip = index.find(*segment_stems(ytid, start, start + 10), *entry["audiocap_ids"])
            if skip := clip_or_skip(clip, entry["where"]):
                yield skip
                continue
            yield Candidate(
                key=f"{ytid}_{int(start)}", audio_path=clip,
                metadata={"captions": entry["captions"], "youtube_id": ytid, "start": start, "end": start + 10,
                          "split": split, "audiocap_ids": entry["audiocap_ids"]},
            )
    yield from skips


@register("complexaudio", "sound", "MIT (the Audio-Reasoner repository's LICENSE, github.com/xzf-thu/Audio-Reasoner); "
                                   "per-clip `licence` where the metadata has one", "MIT")
def complexaudio(root: Path, metadata_file: str = "metadata.jsonl") -> Iterator[Candidate | Skip]:
    """ComplexAudio: complex, overlapping acoustic scenes (mixed sound/speech/music).

    We know of no fixed official release layout, so this adapter reads a generic one (ASSUMED;
    convert your copy to it).
    Layout:
        root/metadata.jsonl, one JSON object a line with
        "audio": path relative to root (required), "id": optional stable id (default: the path),
        "domain": optional, one of sound/speech/music (default sound; any other value: skipped, invalid_domain),
        "licence": optional, and any other fields (captions, labels, transcript, ...) kept as the clip's metadata.
    """
    path = root / metadata_file
    if not path.is_file():
        raise DataError(f"{path}: metadata file not found")
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if "\ufffd" in line:
            yield Skip("undecodable_text", where)
            continue
        try:
            obj = json.loads(line)
            audio = obj.pop("audio")
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            yield Skip("bad_metadata", where)
            continue
        if obj.get("domain") is not None and obj["domain"] not in DOMAINS:
            yield Skip("invalid_domain", where)
            continue
        clip = root / audio
        if skip := clip_or_skip(clip, where):
            yield skip
            continue
        domain, licence = obj.pop("domain", None), obj.pop("licence", None)
        key = str(obj.pop("id", None) or Path(audio).with_suffix("").as_posix().replace("/", "-"))
        yield Candidate(key=key, audio_path=clip, metadata=obj, domain=domain, licence=licence)


# ---------------------------------------------------------------------------------------------
# Speech


MELD_SPLITS = ("train", "dev", "test")
MELD_TWIN = "final_videos_test"


@register("meld", "speech", "GPL-3.0 (MELD release); audio: excerpts of the TV series Friends, research use", "GPL-3.0-only")
def meld(root: Path, splits: Iterable[str] | None = None, audio_dir: str = "audio") -> Iterator[Candidate | Skip]:
    """MELD (Poria et al. 2019): utterances from Friends with emotion and sentiment labels.

    Download: https://affective-meld.github.io (MELD.Raw.tar.gz). The release ships mp4 clips,
    which soundfile cannot read: extract each to wav first, e.g.
        ffmpeg -i train_splits/dia0_utt0.mp4 -vn -ac 1 -ar 16000 audio/train/dia0_utt0.wav
    Layout:
        root/{train,dev,test}_sent_emo.csv   Sr No., Utterance, Speaker, Emotion, Sentiment,
                                             Dialogue_ID, Utterance_ID, Season, Episode, StartTime, EndTime
        root/audio/{train,dev,test}/dia<Dialogue_ID>_utt<Utterance_ID>.wav
    The release's test folder (output_repeated_splits_test) also holds ~130 `final_videos_testdia<D>_utt<U>.mp4`
    twins of test utterances. The plain-named clip is used; a twin is used only where the plain one is
    missing, and every other twin is counted as skipped (meld_test_twin), never ignored silently.
    """
    columns = ("Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID")
    skips: list[Skip] = []
    for split, path in pick_splits(root, "{split}_sent_emo.csv", splits, MELD_SPLITS):
        index = AudioIndex(root / audio_dir / split)
        twins = {stem for stem in index.by_stem if stem.startswith(MELD_TWIN)}
        for where, row in rows_of(read_table(path, columns), skips):
            stem = f"dia{row['Dialogue_ID']}_utt{row['Utterance_ID']}"
            clip = index.find(stem, MELD_TWIN + stem)
            if clip is not None and clip.stem.startswith(MELD_TWIN):
                twins.discard(clip.stem)
            if skip := clip_or_skip(clip, where):
                yield skip
                continue
            yield Candidate(
                key=f"{split}-{stem}", audio_path=clip,
                metadata={"transcript": row["Utterance"], "speaker": row["Speaker"], "emotion": row["Emotion"],
                          "sentiment": row["Sentiment"], "dialogue_id": row["Dialogue_ID"],
                          "utterance_id": row["Utterance_ID"], "split": split},
            )
        skips.extend(Skip("meld_test_twin", str(index.by_stem[stem])) for stem in sorted(twins))
    yield from skips


@register("covost2", "speech", "CC BY-NC 4.0 (CoVoST 2 translations); audio: Common Voice, CC0", "CC-BY-NC-4.0")
def covost2(root: Path, pairs: Iterable[str] | None = None, splits: Iterable[str] = ("train", "dev", "test"),
            clips_dir: str = "clips") -> Iterator[Candidate | Skip]:
    """CoVoST 2 (Wang et al. 2020): Common Voice speech with transcripts and translations.

    Download: https://github.com/facebookresearch/covost (covost_v2.<src>_<tgt>.tsv.tar.gz, split with
    its get_covost_splits.py) and the Common Voice (version 4) clips of the source language from
    https://commonvoice.mozilla.org.
    Layout:
        root/covost_v2.<src>_<tgt>.<split>.tsv   path, sentence, translation, client_id; written by
                                                  get_covost_splits.py with pandas, tab-separated, QUOTE_NONE,
                                                  escapechar "\\" (a tab or quote in a text is escaped), and read so
        root/clips/<path>                         the Common Voice mp3s
    `pairs` (e.g. ["fr_en", "en_de"]) defaults to every pair whose tsv files are present. English->X pairs
    share one clip under each pair's key: collect's dedup keeps one.
    """
    skips: list[Skip] = []
    if pairs is None:
        pairs = sorted({p.name.split(".")[1] for p in root.glob("covost_v2.*_*.*.tsv")})
    if not pairs:
        raise DataError(f"{root}: no covost_v2.<src>_<tgt>.<split>.tsv files found")
    for pair in pairs:
        source, target = pair.split("_", 1)
        for split in splits:
            path = root / f"covost_v2.{pair}.{split}.tsv"
            table = read_table(path, ("path", "sentence", "translation"), encoding="utf-8", delimiter="\t",
                               quoting=csv.QUOTE_NONE, escapechar="\\")
            for where, row in rows_of(table, skips):
                clip = root / clips_dir / row["path"]
                if skip := clip_or_skip(clip, where):
                    yield skip
                    continue
                yield Candidate(
                    key=f"{pair}-{Path(row['path']).stem}", audio_path=clip,
                    metadata={"transcript": row["sentence"], "translation": row["translation"],
                              "source_language": source, "target_language": target, "split": split},
                )
    yield from skips


DAILYTALK_NAME = re.compile(r"^(?P<turn>\d+)_(?P<speaker>\d+)_d(?P<dialogue>\d+)$")


@register("dailytalk", "speech", "CC BY-SA 4.0", "CC-BY-SA-4.0")
def dailytalk(root: Path) -> Iterator[Candidate | Skip]:
    """DailyTalk (Lee et al. 2023): 2,541 recorded DailyDialog conversations, one wav per turn.

    Download: https://github.com/keonlee9420/DailyTalk (dataset link in its README).
    Layout (the release's):
        root/data/<dialogue>/<turn>_<speaker>_d<dialogue>.wav  with the transcript in the .txt beside it
        root/metadata.json   optional; ASSUMED shape {"<dialogue>": {"<turn>": {"emotion", "act", "topic", ...}}}:
                             any such fields are added to the turn's metadata
    Each turn's metadata also carries the transcripts of the dialogue's earlier turns (`context`).
    Counted as skipped: a .txt/.wav whose name misses the pattern (off_pattern_name), a .wav without its
    .txt (wav_without_text), a transcript with bytes that are not UTF-8 (undecodable_text).
    """
    data = root / "data"
    if not data.is_dir():
        raise DataError(f"{data}: folder not found (expected data/<dialogue>/<turn>_<speaker>_d<dialogue>.wav)")
    meta_path = root / "metadata.json"
    extra = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    for folder in sorted((p for p in data.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        turns = []
        for path in sorted(folder.iterdir()):
            match = DAILYTALK_NAME.match(path.stem)
            if path.suffix not in (".txt", ".wav"):
                continue
            if not match:
                yield Skip("off_pattern_name", str(path))
            elif path.suffix == ".txt":
                turns.append((int(match["turn"]), match["speaker"], path))
            elif not path.with_suffix(".txt").is_file():
                yield Skip("wav_without_text", str(path))
        context: list[str] = []
        for turn, speaker, text_path in sorted(turns):
            transcript = text_path.read_text(encoding="utf-8", errors="replace").strip()
            if "\ufffd" in transcript:
                yield Skip("undecodable_text", str(text_path))
                continue
            clip = text_path.with_suffix(".wav")
            if skip := clip_or_skip(clip, str(text_path)):
                yield skip
            else:
                more = extra.get(folder.name, {}).get(str(turn), {})
                metadata = {"transcript": transcript, "speaker": speaker, "dialogue_id": folder.name, "turn": turn,
                            "context": list(context)}
                metadata.update({k: v for k, v in more.items() if k in ("emotion", "act", "topic")} if isinstance(more, dict) else {})
                yield Candidate(key=f"d{folder.name}-{turn}", audio_path=clip, metadata=metadata)
            context.append(f"speaker {speaker}: {transcript}")


# ---------------------------------------------------------------------------------------------
# Music


@register("musicbench", "music", "CC BY-SA 3.0 (MusicBench); audio: MusicCaps/YouTube excerpts", "YouTube-ToS")
def musicbench(root: Path, splits: Iterable[str] | None = None, audio_dir: str = "datashare") -> Iterator[Candidate | Skip]:
    """MusicBench (Melechovsky et al. 2024): 10 s music clips with captions and music features.

    Download: https://huggingface.co/datasets/amaai-lab/MusicBench (MusicBench_{split}.json,
    MusicBench.tar.gz).
    Layout:
        root/MusicBench_{train,test_A,test_B}.json   one JSON object a line (a JSON list also works)
            with location, main_caption, alt_caption, key, bpm, chords, ...
        root/datashare/<location>                      the extracted tarball (location like data/<name>.wav)
    A line that is not JSON counts as bad_metadata (a JSON list that does not parse is an error). test_A and
    test_B share audio: collect's dedup keeps one of each pair.
    """
    for split, path in pick_splits(root, "MusicBench_{split}.json", splits, ("train", "test_A", "test_B")):
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            try:
                rows = list(enumerate(json.loads(text), 1))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
        else:
            rows = [(lineno, line) for lineno, line in enumerate(text.splitlines(), 1) if line.strip()]
        for lineno, row in rows:
            where = f"{path}:{lineno}"
            if isinstance(row, str):
                try:
                    row = json.loads(row)
                except json.JSONDecodeError:
                    yield Skip("bad_metadata", where)
                    continue
            if not isinstance(row, dict) or not row.get("location"):
                yield Skip("bad_metadata", where)
                continue
            clip = root / audio_dir / row["location"]
            if skip := clip_or_skip(clip, where):
                yield skip
                continue
            metadata = {k: row[k] for k in ("main_caption", "alt_caption", "key", "bpm", "chords", "dataset")
                        if row.get(k) not in (None, "")}
            if "main_caption" in metadata:
                metadata["caption"] = metadata.pop("main_caption")
            metadata["split"] = split
            yield Candidate(key=f"{split}-{Path(row['location']).with_suffix('').as_posix().replace('/', '-')}", audio_path=clip,
                            metadata=metadata)


FMA_SUBSETS = {"small": ("small",), "medium": ("small", "medium"), "large": ("small", "medium", "large"),
               "full": ("small", "medium", "large")}


def _fma_tracks(path: Path) -> Iterator[tuple[str, dict[str, str]] | Skip]:
    """tracks.csv has a three-row header (group, field, 'track_id'): rows as {"group.field": value}, or a
    Skip for a row with the wrong number of fields (truncated_row) or bytes that are not UTF-8."""
    if not path.is_file():
        raise DataError(f"{path}: metadata file not found")
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        reader = csv.reader(handle)
        try:
            groups, fields, _ = next(reader), next(reader), next(reader)
        except StopIteration:
            raise DataError(f"{path}: expected the three header rows of FMA's tracks.csv") from None
        names = ["track_id"] + [f"{g}.{f}" for g, f in zip(groups[1:], fields[1:])]
        for needed in ("track.title", "track.genre_top", "set.subset"):
            if needed not in names:
                raise DataError(f"{path}: missing column {needed}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            problem = "truncated_row" if len(row) != len(names) else row_problem(row)
            yield Skip(problem, where) if problem else (where, dict(zip(names, row)))


@register("fma", "music", "CC BY 4.0 (FMA metadata); audio: per-track Creative Commons licences (tracks.csv)", None)
def fma(root: Path, subset: str = "small") -> Iterator[Candidate | Skip]:
    """FMA (Defferrard et al. 2017): Free Music Archive tracks with genre labels.

    Download: https://github.com/mdeff/fma (fma_metadata.zip, fma_{small,medium,large,full}.zip).
    Layout:
        root/fma_metadata/tracks.csv   three header rows; track.title, track.genre_top, track.genres_all,
                                       track.license, artist.name, set.subset, set.split
        root/fma_metadata/genres.csv   genre_id, title (optional: genre names of track.genres_all)
        root/fma_<subset>/<000-155>/<track_id:06d>.mp3
    `subset` picks the tracks of that subset (small is inside medium inside large; full: all).
    A few FMA mp3s are known to be broken; the probe rejects them (unreadable_clip). A track without
    track.license has no known licence (the metadata's CC BY 4.0 does not cover the audio).
    """
    skips: list[Skip] = []
    if subset not in FMA_SUBSETS:
        raise DataError(f"fma: subset {subset!r} is not one of {list(FMA_SUBSETS)}")
    genres_path = root / "fma_metadata" / "genres.csv"
    genre_names = ({row["genre_id"]: row["title"] for _, row in rows_of(read_table(genres_path, ("genre_id", "title")), skips)}
                   if genres_path.is_file() else {})
    audio = root / f"fma_{subset}"
    for where, row in rows_of(_fma_tracks(root / "fma_metadata" / "tracks.csv"), skips):
        if subset != "full" and row.get("set.subset") not in FMA_SUBSETS[subset]:
            continue
        try:
            track = int(row["track_id"])
        except ValueError:
            yield Skip("bad_metadata", where)
            continue
        clip = audio / f"{track:06d}"[:3] / f"{track:06d}.mp3"
        if skip := clip_or_skip(clip, where):
            yield skip
            continue
        genre_ids = re.findall(r"\d+", row.get("track.genres_all", ""))
        metadata = {"title": row["track.title"], "artist": row.get("artist.name", ""), "genre": row["track.genre_top"] or None,
                    "genres": [genre_names.get(g, g) for g in genre_ids], "split": row.get("set.split", "")}
        yield Candidate(key=f"{track:06d}", audio_path=clip, metadata=metadata, licence=row.get("track.license") or None)
    yield from skips


@register("medley_solos", "music", "CC BY 4.0", "CC-BY-4.0")
def medley_solos(root: Path, audio_dir: str = "audio") -> Iterator[Candidate | Skip]:
    """Medley-solos-DB (Lostanlen & Cella 2016): 3 s solo excerpts of eight instruments.

    Download: https://zenodo.org/records/3464194 (Medley-solos-DB_metadata.csv, Medley-solos-DB.tar.gz).
    Layout:
        root/Medley-solos-DB_metadata.csv   subset, instrument, instrument_id, song_id, uuid4
        root/audio/Medley-solos-DB_<subset>-<instrument_id>_<uuid4>.wav   (any subfolder of audio/)
    """
    index = AudioIndex(root / audio_dir)
    skips: list[Skip] = []
    for where, row in rows_of(read_table(root / "Medley-solos-DB_metadata.csv", ("subset", "instrument", "instrument_id", "uuid4")), skips):
        clip = index.find(f"Medley-solos-DB_{row['subset']}-{row['instrument_id']}_{row['uuid4']}")
        if skip := clip_or_skip(clip, where):
            yield skip
            continue
        yield Candidate(
            key=row["uuid4"], audio_path=clip,
            metadata={"instrument": row["instrument"], "instrument_id": row["instrument_id"],
                      "song_id": row.get("song_id", ""), "split": row["subset"]},
        )
    yield from skips


# ---------------------------------------------------------------------------------------------
# The embedded tiny default


@register("synthetic", "sound", "Apache-2.0 (generated by data_prep.synthetic)", "Apache-2.0")
def synthetic(root: Path, split: str = "train") -> Iterator[Candidate | Skip]:
    """The synthetic benchmark (`python -m data_prep.synthetic`) read as a raw dataset.

    Layout: root/<split>.jsonl (MMAR schema + `facts`) and root/audio/<id>.wav. Only the signal's
    ground truth goes into the metadata (task, facts), never the ready-made question or answer.
    """
    path = root / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: metadata file not found (make data)")
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        where = f"{path}:{lineno}"
        clip = root / record["audio_path"]
        if skip := clip_or_skip(clip, where):
            yield skip
            continue
        yield Candidate(
            key=record["id"], audio_path=clip, domain=record.get("modality") if record.get("modality") in DOMAINS else None,
            metadata={"task": record.get("sub-category"), "facts": record.get("facts", {})},
        )
