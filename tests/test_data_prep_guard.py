"""The contamination guard against MMAR metadata (tests/data/mmar_sample.jsonl, real records), with planted overlaps."""

import json
from pathlib import Path

import numpy as np
import soundfile as sf

from core.audio import write_wav
from core.recipe import DataPrepConfig
from data_prep.__main__ import main as cli
from data_prep.collect import collect
from data_prep.guard import ContaminationIndex, guard_file, normalise_question, youtube_segment


def mmar_records(meta: Path) -> list[dict]:
    return [json.loads(l) for l in meta.read_text().splitlines() if l.strip()]


def youtube_record(records: list[dict]) -> dict:
    return next(r for r in records if "youtube.com/watch" in r["url"] and not r["timestamp"].startswith("00:00:00"))


def test_normalise_question():
    assert normalise_question("  What's  the SPEAKER's\tmood?! ") == "what s the speaker s mood"
    assert normalise_question("Ｗｈｙ—now…") == normalise_question("why now")


def test_planted_question_duplicate_is_caught(mmar_meta):
    mmar = mmar_records(mmar_meta)
    index = ContaminationIndex.from_meta(mmar_meta)
    target = mmar[17]
    planted = {"id": "qa-1", "question": "  " + target["question"].upper().replace(" ", "   ") + " ?!", "audio_path": "x.wav"}
    hit = index.check(planted)
    assert hit and hit[0].startswith("question:")
    found = next(r["question"] for r in mmar if r["id"] == hit[0].split(":", 1)[1])
    assert normalise_question(found) == normalise_question(target["question"])
    assert index.check({"id": "qa-2", "question": "How many beeps can you hear in this clip?"}) == []
    assert index.checks == ["question", "youtube"] and not index.audio  # no MMAR audio here: audio check off


def test_planted_audio_duplicate_is_caught(tmp_path, mmar_meta):
    records = mmar_records(mmar_meta)
    target = records[3]
    rng = np.random.default_rng(0)
    signal = (0.2 * rng.standard_normal(16000)).astype(np.float32)
    write_wav(tmp_path / "mmar" / target["audio_path"], signal)  # a stand-in for one MMAR clip
    index = ContaminationIndex.from_meta(mmar_meta, audio_root=tmp_path / "mmar")
    assert len(index.audio) == 1 and index.audio_missing == len(records) - 1
    (tmp_path / "train").mkdir()
    pcm, rate = sf.read(tmp_path / "mmar" / target["audio_path"], dtype="int16")
    sf.write(tmp_path / "train" / "copy.flac", pcm, rate)  # the same samples in another container ...
    sf.write(tmp_path / "train" / "copy24.wav", pcm.astype(np.int32) << 16, rate, subtype="PCM_24")  # ... and bit depth
    write_wav(tmp_path / "train" / "other.wav", signal * 0.5)
    for name in ("copy.flac", "copy24.wav"):
        assert index.check({"id": name, "audio_path": name}, tmp_path / "train") == [f"audio:{target['id']}"]
    assert index.check({"id": "b", "audio_path": "other.wav"}, tmp_path / "train") == []


def test_youtube_segment_overlap(mmar_meta):
    target = youtube_record(mmar_records(mmar_meta))
    video, start, end = youtube_segment(target)
    index = ContaminationIndex.from_meta(mmar_meta)
    inside = {"id": "audioset-x", "metadata": {"youtube_id": video, "start": start + 1, "end": start + 11}}
    before = {"id": "audioset-y", "metadata": {"youtube_id": video, "start": max(0.0, start - 20), "end": max(0.0, start - 10)}}
    assert index.check(inside) == [f"youtube:{target['id']}"]
    assert index.check(before) == []


def test_guard_cli_refuses_then_flags(tmp_path, mmar_meta, capsys):
    mmar = mmar_records(mmar_meta)
    sft = tmp_path / "sft.jsonl"
    rows = [{"id": "ok", "question": "Which tone is higher?"}, {"id": "bad", "question": mmar[0]["question"].lower()}]
    sft.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["guard", str(sft), "--meta", str(mmar_meta)]) == 1
    printed = capsys.readouterr()
    assert json.loads(printed.out)["flagged"] == 1 and "id=bad" in printed.err
    assert cli(["guard", str(sft), "--meta", str(mmar_meta), "--out", str(tmp_path / "clean.jsonl")]) == 0
    assert [json.loads(l)["id"] for l in (tmp_path / "clean.jsonl").read_text().splitlines()] == ["ok"]
    report = guard_file(sft, ContaminationIndex.from_meta(mmar_meta))
    assert report["flagged_by_check"] == {"question": 1} and report["audio_check"].startswith("off")


def test_collect_rejects_clips_cut_from_mmar_videos(tmp_path, mmar_meta):
    video, start, _ = youtube_segment(youtube_record(mmar_records(mmar_meta)))
    root = tmp_path / "audiocaps"
    root.mkdir()
    (root / "train.csv").write_text(f"audiocap_id,youtube_id,start_time,caption\n1,{video},{int(start)},from MMAR\n2,cleanclip01,0,clean\n")
    write_wav(root / "audio" / f"{video}_{int(start)}.wav", np.zeros(16000, np.float32))
    write_wav(root / "audio" / "cleanclip01_0.wav", np.full(16000, 0.1, np.float32))  # other audio: collect keeps one per content
    config = DataPrepConfig(work_dir=str(tmp_path / "work"), sources=[{"name": "audiocaps", "root": str(root)}],
                            mmar_meta=str(mmar_meta))
    report = collect(config, show_progress=False)
    assert report["rejected"] == {"mmar_overlap_youtube": 1} and report["out"] == 1
    assert report["guard"]["checks"] == ["question", "youtube"]
