"""Each dataset adapter on a few generated files in that dataset's release layout.

Every test plants one clip that is listed but not downloaded (skipped at scan: missing_clip) and
one that is not audio (rejected by the probe: unreadable_clip), and checks both are counted.
"""

import csv
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from core.audio import write_wav
from core.recipe import DataPrepConfig
from data_prep.collect import collect
from data_prep.sources import ADAPTERS


def tone(path: Path, seconds: float, rate: int) -> np.ndarray:
    """A sine whose pitch depends on the file name: clips differ in content (collect removes identical audio)."""
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * (200 + zlib.crc32(path.name.encode()) % 800) * t)).astype(np.float32)


def wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    write_wav(path, tone(path, seconds, rate), rate)
    return path


def mp3(path: Path, seconds: float, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), tone(path, seconds, rate), rate, format="MP3")
    return path


def corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not audio" * 10)
    return path


def write_csv(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)


def run(tmp_path: Path, name: str, root: Path, **options) -> tuple[dict[str, dict], dict]:
    config = DataPrepConfig(work_dir=str(tmp_path / "work"), sources=[{"name": name, "root": str(root), "options": options}],
                            min_seconds=0.1)
    report = collect(config, show_progress=False)
    manifest = [json.loads(line) for line in (tmp_path / "work" / "collect.jsonl").read_text().splitlines()]
    assert len({r["id"] for r in manifest}) == len(manifest)
    for record in manifest:
        assert record["source"] == name and Path(record["audio_path"]).is_file()
    return {r["id"]: r for r in manifest}, report


def assert_counted(report: dict, name: str, missing: int = 1, unreadable: int = 1) -> None:
    assert report["scan"][name]["skipped"].get("missing_clip", 0) == missing
    assert report["rejected"].get("unreadable_clip", 0) == unreadable


def test_every_recipe_dataset_has_an_adapter():
    expected = {"audioset", "clotho", "audiocaps", "complexaudio", "meld", "covost2", "dailytalk", "musicbench", "fma", "medley_solos"}
    assert expected <= set(ADAPTERS)
    for adapter in ADAPTERS.values():
        assert adapter.domain in ("sound", "speech", "music") and adapter.licence
        assert "Layout" in (adapter.scan.__doc__ or ""), f"{adapter.name}: docstring must describe the layout"


def test_audioset(tmp_path):
    root = tmp_path / "audioset"
    root.mkdir()
    (root / "ontology.json").write_text(json.dumps([
        {"id": "/m/09x0r", "name": "Speech"}, {"id": "/m/04rlf", "name": "Music"}, {"id": "/m/0bt9lr", "name": "Dog"},
    ]))
    (root / "balanced_train_segments.csv").write_text(
        "# Segments csv created Sun Mar  5 10:54:31 2017\n"
        "# num_ytids=4, num_segs=4, num_unique_labels=3, num_positive_labels=5\n"
        "# YTID, start_seconds, end_seconds, positive_labels\n"
        '--PJHxphWEs, 30.000, 40.000, "/m/09x0r"\n'
        '-0RWZT-miFs, 420.000, 430.000, "/m/04rlf"\n'
        '-1nilez17Dg, 30.000, 40.000, "/m/0bt9lr,/m/09x0r,/m/04rlf"\n'
        'absentclip1, 0.000, 10.000, "/m/0bt9lr"\n'
        'brokenclip1, 0.000, 10.000, "/m/0bt9lr"\n'
    )
    wav(root / "audio" / "balanced" / "Y--PJHxphWEs_30.000_40.000.wav", 2.0)
    wav(root / "audio" / "-0RWZT-miFs_420.wav", 1.5, rate=44100)
    wav(root / "audio" / "-1nilez17Dg.wav", 1.0)
    corrupt(root / "audio" / "brokenclip1_0.wav")
    manifest, report = run(tmp_path, "audioset", root)
    assert sorted(manifest) == ["audioset---PJHxphWEs_30", "audioset--0RWZT-miFs_420", "audioset--1nilez17Dg_30"]
    speech, music, mixed = (manifest[k] for k in sorted(manifest))
    assert speech["duration"] == pytest.approx(2.0) and speech["domain"] == "speech"
    assert music["duration"] == pytest.approx(1.5) and music["sample_rate"] == 44100 and music["domain"] == "music"
    assert mixed["domain"] == "sound" and mixed["metadata"]["labels"] == ["Dog", "Speech", "Music"]
    assert speech["metadata"] == {"labels": ["Speech"], "label_ids": ["/m/09x0r"], "youtube_id": "--PJHxphWEs",
                                "start": 30.0, "end": 40.0, "split": "balanced_train"}
    assert speech["licence"].startswith("CC BY 4.0")
    assert_counted(report, "audioset")


def test_clotho(tmp_path):
    root = tmp_path / "clotho"
    header = ["file_name"] + [f"caption_{i}" for i in range(1, 6)]
    write_csv(root / "clotho_captions_development.csv", header, [
        ["Birds at dawn.wav"] + [f"birds sing {i}" for i in range(5)],
        ["rain.wav"] + [f"rain falls {i}" for i in range(5)],
        ["absent.wav"] + ["x"] * 5,
        ["broken.wav"] + ["y"] * 5,
    ])
    write_csv(root / "clotho_metadata_development.csv",
              ["file_name", "keywords", "sound_id", "sound_link", "start_end_samples", "manufacturer", "license"],
              [["Birds at dawn.wav", "birds;morning", "123", "", "", "", "Attribution"]])
    write_csv(root / "clotho_captions_evaluation.csv", header, [["door.wav"] + ["a door slams"] * 5])
    wav(root / "development" / "Birds at dawn.wav", 3.0, rate=44100)
    wav(root / "development" / "rain.wav", 2.5)
    wav(root / "evaluation" / "door.wav", 1.0)
    corrupt(root / "development" / "broken.wav")
    manifest, report = run(tmp_path, "clotho", root)
    assert sorted(manifest) == ["clotho-development-Birds at dawn", "clotho-development-rain", "clotho-evaluation-door"]
    birds = manifest["clotho-development-Birds at dawn"]
    assert birds["duration"] == pytest.approx(3.0) and birds["domain"] == "sound"
    assert birds["metadata"]["captions"] == [f"birds sing {i}" for i in range(5)]
    assert birds["metadata"]["keywords"] == ["birds", "morning"] and birds["licence"] == "Attribution"
    assert "Freesound" in manifest["clotho-development-rain"]["licence"]  # no per-clip licence: the dataset's
    assert_counted(report, "clotho")


def test_audiocaps(tmp_path):
    root = tmp_path / "audiocaps"
    header = ["audiocap_id", "youtube_id", "start_time", "caption"]
    write_csv(root / "train.csv", header, [["91139", "r1nicOVtvkQ", "130", "A woman talks nearby as water pours"],
                                           ["58146", "UDGBjjwyaqE", "20", "Multiple clanging and clanking sounds"],
                                           ["11111", "brokenclip1", "0", "noise"]])
    write_csv(root / "val.csv", header, [["97151", "vfY_TJq7n_U", "130", "Rustling occurs, ducks quack"],
                                         ["97152", "vfY_TJq7n_U", "130", "Ducks quack while leaves rustle"],
                                         ["97153", "absentclip1", "30", "Nothing here"]])
    wav(root / "audio" / "train" / "r1nicOVtvkQ_130.wav", 1.0)
    wav(root / "audio" / "train" / "58146.wav", 2.0)  # named by audiocap_id
    wav(root / "audio" / "val" / "YvfY_TJq7n_U_130.000_140.000.wav", 1.25)
    corrupt(root / "audio" / "brokenclip1_0.wav")
    manifest, report = run(tmp_path, "audiocaps", root)
    assert sorted(manifest) == ["audiocaps-UDGBjjwyaqE_20", "audiocaps-r1nicOVtvkQ_130", "audiocaps-vfY_TJq7n_U_130"]
    ducks = manifest["audiocaps-vfY_TJq7n_U_130"]
    assert ducks["metadata"]["captions"] == ["Rustling occurs, ducks quack", "Ducks quack while leaves rustle"]
    assert ducks["metadata"]["youtube_id"] == "vfY_TJq7n_U" and ducks["metadata"]["start"] == 130.0
    assert ducks["duration"] == pytest.approx(1.25) and ducks["domain"] == "sound" and "MIT" in ducks["licence"]
    assert manifest["audiocaps-UDGBjjwyaqE_20"]["duration"] == pytest.approx(2.0)
    assert_counted(report, "audiocaps")


def test_complexaudio(tmp_path):
    root = tmp_path / "complexaudio"
    wav(root / "clips" / "scene1.wav", 2.0)
    wav(root / "clips" / "scene2.wav", 1.0)
    corrupt(root / "clips" / "broken.wav")
    lines = [
        {"audio": "clips/scene1.wav", "id": "s1", "caption": "a crowd cheers while a band plays", "domain": "music",
         "licence": "CC BY 4.0"},
        {"audio": "clips/scene2.wav", "caption": "traffic and speech", "labels": ["car", "speech"]},
        {"audio": "clips/absent.wav", "caption": "gone"},
        {"audio": "clips/broken.wav", "caption": "broken"},
    ]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\nnot json\n")
    manifest, report = run(tmp_path, "complexaudio", root)
    assert sorted(manifest) == ["complexaudio-clips-scene2", "complexaudio-s1"]
    s1, s2 = manifest["complexaudio-s1"], manifest["complexaudio-clips-scene2"]
    assert s1["domain"] == "music" and s1["licence"] == "CC BY 4.0" and s1["metadata"] == {"caption": "a crowd cheers while a band plays"}
    assert s2["domain"] == "sound" and s2["metadata"]["labels"] == ["car", "speech"] and s2["duration"] == pytest.approx(1.0)
    assert s2["licence"].startswith("MIT") and s2["licence_id"] == "MIT" and s1["licence_id"] == "CC-BY-4.0"
    assert report["scan"]["complexaudio"]["skipped"]["bad_metadata"] == 1
    assert_counted(report, "complexaudio")


def test_meld(tmp_path):
    root = tmp_path / "meld"
    header = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID", "Season", "Episode",
              "StartTime", "EndTime"]
    write_csv(root / "train_sent_emo.csv", header, [
        ["1", "Oh my God, he's lost it.", "Phoebe", "surprise", "negative", "0", "0", "4", "7", "00:20:57,256", "00:21:00,049"],
        ["2", "Or! Or, we could go to the bank.", "Monica", "joy", "positive", "0", "1", "4", "7", "00:21:00,100", "00:21:02,000"],
        ["3", "Missing.", "Ross", "neutral", "neutral", "1", "0", "4", "7", "", ""],
        ["4", "Broken.", "Joey", "anger", "negative", "2", "0", "4", "7", "", ""],
    ])
    write_csv(root / "test_sent_emo.csv", header, [["1", "Why?", "Rachel", "sadness", "negative", "5", "3", "1", "1", "", ""]])
    wav(root / "audio" / "train" / "dia0_utt0.wav", 2.75)
    wav(root / "audio" / "train" / "dia0_utt1.wav", 1.0)
    wav(root / "audio" / "test" / "dia5_utt3.wav", 0.5)
    corrupt(root / "audio" / "train" / "dia2_utt0.wav")
    manifest, report = run(tmp_path, "meld", root)
    assert sorted(manifest) == ["meld-test-dia5_utt3", "meld-train-dia0_utt0", "meld-train-dia0_utt1"]
    first = manifest["meld-train-dia0_utt0"]
    assert first["domain"] == "speech" and first["duration"] == pytest.approx(2.75) and "GPL-3.0" in first["licence"]
    assert first["metadata"] == {"transcript": "Oh my God, he's lost it.", "speaker": "Phoebe", "emotion": "surprise",
                                 "sentiment": "negative", "dialogue_id": "0", "utterance_id": "0", "split": "train"}
    assert_counted(report, "meld")


def test_covost2(tmp_path):
    root = tmp_path / "covost2"
    header = ["path", "sentence", "translation", "client_id"]
    write_csv(root / "covost_v2.fr_en.train.tsv", header, [
        ["common_voice_fr_1.mp3", "Bonjour à tous.", "Hello everyone.", "abc"],
        ["common_voice_fr_2.mp3", "Il pleut.", "It's raining.", "def"],
        ["common_voice_fr_3.mp3", "Absent.", "Missing.", "ghi"],
    ], delimiter="\t")
    write_csv(root / "covost_v2.fr_en.dev.tsv", header, [["common_voice_fr_4.mp3", "Cassé.", "Broken.", "jkl"]], delimiter="\t")
    write_csv(root / "covost_v2.fr_en.test.tsv", header, [], delimiter="\t")
    mp3(root / "clips" / "common_voice_fr_1.mp3", 2.0)
    mp3(root / "clips" / "common_voice_fr_2.mp3", 1.0, rate=48000)
    corrupt(root / "clips" / "common_voice_fr_4.mp3")
    manifest, report = run(tmp_path, "covost2", root)
    assert sorted(manifest) == ["covost2-fr_en-common_voice_fr_1", "covost2-fr_en-common_voice_fr_2"]
    hello = manifest["covost2-fr_en-common_voice_fr_1"]
    assert hello["duration"] == pytest.approx(2.0, abs=0.05) and hello["domain"] == "speech"  # mp3 read by soundfile
    assert hello["metadata"] == {"transcript": "Bonjour à tous.", "translation": "Hello everyone.", "source_language": "fr",
                                 "target_language": "en", "split": "train"}
    assert "CC BY-NC 4.0" in hello["licence"]
    assert_counted(report, "covost2")


def test_dailytalk(tmp_path):
    root = tmp_path / "dailytalk"
    for name, text, seconds in [("0_1_d0", "Hi, how are you?", 1.5), ("1_0_d0", "Fine, thanks.", 1.0), ("0_0_d1", "Where is it?", 0.0),
                                ("1_1_d1", "Over there.", None)]:
        (root / "data" / name.split("_d")[1]).mkdir(parents=True, exist_ok=True)
        (root / "data" / name.split("_d")[1] / f"{name}.txt").write_text(text + "\n")
        if seconds:
            wav(root / "data" / name.split("_d")[1] / f"{name}.wav", seconds)
        elif seconds is None:
            corrupt(root / "data" / "1" / f"{name}.wav")
    (root / "metadata.json").write_text(json.dumps({"0": {"1": {"emotion": "happiness", "act": "inform", "topic": "ordinary life"}}}))
    manifest, report = run(tmp_path, "dailytalk", root)
    assert sorted(manifest) == ["dailytalk-d0-0", "dailytalk-d0-1"]
    reply = manifest["dailytalk-d0-1"]
    assert reply["domain"] == "speech" and reply["duration"] == pytest.approx(1.0) and reply["licence"] == "CC BY-SA 4.0"
    assert reply["metadata"] == {"transcript": "Fine, thanks.", "speaker": "0", "dialogue_id": "0", "turn": 1,
                                 "context": ["speaker 1: Hi, how are you?"], "emotion": "happiness", "act": "inform",
                                 "topic": "ordinary life"}
    assert_counted(report, "dailytalk")


def test_musicbench(tmp_path):
    root = tmp_path / "musicbench"
    rows = [
        {"dataset": "MusicCaps", "location": "data/-0SdAVK79lg_1.wav", "main_caption": "A mellow piano ballad.",
         "alt_caption": "Piano.", "key": ["A", "minor"], "bpm": 72.0, "chords": ["Am", "F"]},
        {"dataset": "MusicCaps", "location": "data_aug2/-0SdAVK79lg_1_2.wav", "main_caption": "A faster piano ballad.", "bpm": 90.0},
        {"dataset": "MusicCaps", "location": "data/absent.wav", "main_caption": "gone"},
        {"dataset": "MusicCaps", "location": "data/broken.wav", "main_caption": "broken"},
    ]
    (root).mkdir()
    (root / "MusicBench_train.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    wav(root / "datashare" / "data" / "-0SdAVK79lg_1.wav", 2.0)
    wav(root / "datashare" / "data_aug2" / "-0SdAVK79lg_1_2.wav", 1.0)
    corrupt(root / "datashare" / "data" / "broken.wav")
    manifest, report = run(tmp_path, "musicbench", root)
    assert sorted(manifest) == ["musicbench-train-data--0SdAVK79lg_1", "musicbench-train-data_aug2--0SdAVK79lg_1_2"]
    ballad = manifest["musicbench-train-data--0SdAVK79lg_1"]
    assert ballad["domain"] == "music" and ballad["duration"] == pytest.approx(2.0)
    assert ballad["metadata"] == {"caption": "A mellow piano ballad.", "alt_caption": "Piano.", "key": ["A", "minor"], "bpm": 72.0,
                                  "chords": ["Am", "F"], "dataset": "MusicCaps", "split": "train"}
    assert "CC BY-SA" in ballad["licence"]
    assert_counted(report, "musicbench")


def test_fma(tmp_path):
    root = tmp_path / "fma"
    meta = root / "fma_metadata"
    meta.mkdir(parents=True)
    (meta / "tracks.csv").write_text(
        ",artist,set,set,track,track,track,track\n"
        ",name,split,subset,genre_top,genres_all,license,title\n"
        "track_id,,,,,,,\n"
        '2,AWOL,training,small,Hip-Hop,[21],Attribution-NonCommercial-ShareAlike 3.0 International,Food\n'
        '5,AWOL,validation,small,Rock,"[12, 25]",Attribution 4.0,This World\n'
        '10,Kurt Vile,training,medium,Pop,[10],,Freeway\n'
        '20,Chris,test,small,Folk,[17],,Absent\n'
        '26,Dan,training,small,Folk,[17],,Broken\n'
    )
    write_csv(meta / "genres.csv", ["genre_id", "#tracks", "parent", "title", "top_level"],
              [["21", "1", "0", "Hip-Hop", "21"], ["12", "1", "0", "Rock", "12"], ["25", "1", "12", "Punk", "12"]])
    mp3(root / "fma_small" / "000" / "000002.mp3", 2.0, rate=44100)
    mp3(root / "fma_small" / "000" / "000005.mp3", 1.0)
    corrupt(root / "fma_small" / "000" / "000026.mp3")
    manifest, report = run(tmp_path, "fma", root)  # subset small: track 10 (medium) is not considered
    assert sorted(manifest) == ["fma-000002", "fma-000005"]
    food, world = manifest["fma-000002"], manifest["fma-000005"]
    assert food["domain"] == "music" and food["duration"] == pytest.approx(2.0, abs=0.05)
    assert food["metadata"] == {"title": "Food", "artist": "AWOL", "genre": "Hip-Hop", "genres": ["Hip-Hop"], "split": "training"}
    assert food["licence"] == "Attribution-NonCommercial-ShareAlike 3.0 International"  # the track's own licence
    assert world["metadata"]["genres"] == ["Rock", "Punk"]
    assert_counted(report, "fma")


def test_medley_solos(tmp_path):
    root = tmp_path / "medley"
    write_csv(root / "Medley-solos-DB_metadata.csv", ["subset", "instrument", "instrument_id", "song_id", "uuid4"], [
        ["training", "clarinet", "0", "0", "0e4371ac-1c6a-51ab-fdb7-f8abd5fbf1a3"],
        ["test", "violin", "7", "12", "9f1ee1e3-e1b5-5b6c-d6c9-6fd4c5fdd5a1"],
        ["validation", "piano", "4", "3", "absent00-0000-0000-0000-000000000000"],
        ["training", "flute", "3", "2", "broken00-0000-0000-0000-000000000000"],
    ])
    wav(root / "audio" / "Medley-solos-DB_training-0_0e4371ac-1c6a-51ab-fdb7-f8abd5fbf1a3.wav", 3.0, rate=22050)
    wav(root / "audio" / "test" / "Medley-solos-DB_test-7_9f1ee1e3-e1b5-5b6c-d6c9-6fd4c5fdd5a1.wav", 3.0, rate=22050)
    corrupt(root / "audio" / "Medley-solos-DB_training-3_broken00-0000-0000-0000-000000000000.wav")
    manifest, report = run(tmp_path, "medley_solos", root)
    assert sorted(manifest) == ["medley_solos-0e4371ac-1c6a-51ab-fdb7-f8abd5fbf1a3", "medley_solos-9f1ee1e3-e1b5-5b6c-d6c9-6fd4c5fdd5a1"]
    clarinet = manifest["medley_solos-0e4371ac-1c6a-51ab-fdb7-f8abd5fbf1a3"]
    assert clarinet["domain"] == "music" and clarinet["duration"] == pytest.approx(3.0) and clarinet["sample_rate"] == 22050
    assert clarinet["metadata"] == {"instrument": "clarinet", "instrument_id": "0", "song_id": "0", "split": "training"}
    assert clarinet["licence"] == "CC BY 4.0"
    assert_counted(report, "medley_solos")


def test_synthetic_as_raw_source(tmp_path, synthetic_dir):
    root = tmp_path / "synthetic"
    root.mkdir()
    records = [json.loads(l) for l in (synthetic_dir / "train.jsonl").read_text().splitlines()[:3]]
    for record in records:
        record["audio_path"] = str(synthetic_dir / record["audio_path"])
    missing = dict(records[0], id="syn-missing", audio_path=str(tmp_path / "absent.wav"))
    broken = dict(records[0], id="syn-broken", audio_path=str(corrupt(tmp_path / "broken.wav")))
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records + [missing, broken]) + "\n")
    manifest, report = run(tmp_path, "synthetic", root)
    assert sorted(manifest) == sorted(f"synthetic-{r['id']}" for r in records)
    beeps = manifest[f"synthetic-{records[0]['id']}"]
    assert beeps["metadata"] == {"task": "Counting", "facts": records[0]["facts"]}
    assert "question" not in json.dumps(beeps) and beeps["domain"] == records[0]["modality"]
    assert beeps["duration"] == pytest.approx(sf.info(records[0]["audio_path"]).duration, abs=1e-3)
    assert_counted(report, "synthetic")


def test_bad_options_and_missing_layout_are_clear_errors(tmp_path):
    from core.items import DataError

    root = tmp_path / "fma"
    root.mkdir()
    with pytest.raises(DataError, match=r"source fma: bad options \{'subsett': 'small'\}"):
        run(tmp_path, "fma", root, subsett="small")
    with pytest.raises(DataError, match=r"tracks\.csv: metadata file not found"):
        run(tmp_path, "fma", root)
    with pytest.raises(DataError, match="unknown dataset adapter 'clothoo'"):
        run(tmp_path, "clothoo", root)
