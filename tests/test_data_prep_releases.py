"""The Cogito-Pipe adapters on the files as the real releases publish them (issue 29): one test per item.

Metadata fixtures: tests/fixtures/sources/ (its README names the public source of each layout detail);
the audio is generated here (name-dependent tones, so distinct clips differ in content).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from core.items import DataError
from core.recipe import DataConfig, DataPrepConfig, RecipeError, SourceSpec, load_recipe
from data_prep.__main__ import main as cli
from data_prep.card import write_card
from data_prep.collect import collect, sample_mixture
from data_prep.sources import ADAPTERS, licence_id
from tests.test_data_prep_sources import mp3, tone, wav, write_csv
from train import memory
from train.data_cache import sample_limit

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "sources"


def fixture(tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def ogg(path: Path, seconds: float, rate: int = 16000, subtype: str = "VORBIS") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), tone(path, seconds, rate), rate, format="OGG", subtype=subtype)
    return path


def run_collect(tmp_path: Path, sources: list[dict], max_seconds: float | None = None, **settings) -> tuple[dict, dict]:
    config = DataPrepConfig(work_dir=str(tmp_path / "work"), sources=sources, min_seconds=0.1, **settings)
    report = collect(config, show_progress=False, max_seconds=max_seconds)
    manifest = [json.loads(line) for line in (tmp_path / "work" / "collect.jsonl").read_text().splitlines()]
    return {r["id"]: r for r in manifest}, report


def test_1_audioset_download_names(tmp_path):
    """audioset-download's `{ytid}_{start}-{end}.{ext}` in label folders: .ogg (its default), .opus, .flac."""
    root = fixture(tmp_path, "audioset")
    speech = ogg(root / "audio" / "Speech" / "--PJHxphWEs_30.0-40.0.ogg", 2.0)
    (root / "audio" / "Dog").mkdir()
    shutil.copy(speech, root / "audio" / "Dog" / speech.name)  # copy_and_replicate: a copy per further label
    ogg(root / "audio" / "Music" / "-0RWZT-miFs_420.0-430.0.opus", 1.5, rate=48000, subtype="OPUS")
    sf.write(str(root / "audio" / "Dog" / "-1nilez17Dg_0.0-10.0.flac"), tone(Path("x"), 1.0, 16000), 16000)
    manifest, report = run_collect(tmp_path, [{"name": "audioset", "root": str(root)}])
    assert sorted(manifest) == ["audioset---PJHxphWEs_30", "audioset--0RWZT-miFs_420", "audioset--1nilez17Dg_0"]
    first = manifest["audioset---PJHxphWEs_30"]
    assert first["audio_path"] == str((root / "audio" / "Dog" / speech.name).resolve())  # one of the identical copies
    assert first["duration"] == pytest.approx(2.0) and first["metadata"]["labels"] == ["Speech", "Dog"]
    assert first["domain"] == "speech" and first["licence_id"] == "YouTube-ToS"
    music = manifest["audioset--0RWZT-miFs_420"]
    assert music["sample_rate"] == 48000 and music["duration"] == pytest.approx(1.5, abs=0.02) and music["domain"] == "music"
    assert report["scan"]["audioset"]["skipped"] == {} and report["rejected"] == {}


def test_2_clotho_metadata_is_iso_8859_1(tmp_path):
    root = fixture(tmp_path, "clotho")
    wav(root / "development" / "Café ambience.wav", 2.0)
    wav(root / "development" / "rain.wav", 1.5)
    manifest, report = run_collect(tmp_path, [{"name": "clotho", "root": str(root)}])
    cafe, rain = manifest["clotho-development-Café ambience"], manifest["clotho-development-rain"]
    assert cafe["metadata"]["keywords"] == ["café", "chatter", "dishes"] and cafe["metadata"]["freesound_id"] == "123456"
    assert cafe["licence"] == "http://creativecommons.org/licenses/by-nc/3.0/" and cafe["licence_id"] == "CC-BY-NC-3.0"
    assert rain["licence_id"] == "CC0-1.0" and rain["metadata"]["keywords"] == ["rain", "roof"]
    assert report["scan"]["clotho"]["skipped"] == {}


def test_3_covost_tsvs_read_with_the_escape_char(tmp_path):
    root = fixture(tmp_path, "covost2")
    mp3(root / "clips" / "common_voice_en_18.mp3", 1.0)
    mp3(root / "clips" / "common_voice_en_19.mp3", 1.2)
    manifest, report = run_collect(tmp_path, [{"name": "covost2", "root": str(root)}])
    quoted = manifest["covost2-en_de-common_voice_en_18"]["metadata"]
    assert quoted["transcript"] == 'He said "hello" twice.' and quoted["translation"] == 'Er sagte zweimal "hallo".'
    tabbed = manifest["covost2-en_de-common_voice_en_19"]["metadata"]  # an escaped tab does not shift the columns
    assert tabbed["transcript"] == "A tab\there and a back\\slash." and tabbed["translation"] == "Ein Tab\thier."
    assert report["scan"]["covost2"]["skipped"] == {}


def test_4_meld_test_twins_are_used_or_counted(tmp_path):
    root = fixture(tmp_path, "meld")
    test = root / "audio" / "test"
    wav(test / "dia0_utt0.wav", 1.0)
    wav(test / "final_videos_testdia0_utt0.wav", 1.0)  # twin of a present clip: counted
    wav(test / "final_videos_testdia0_utt1.wav", 1.2)  # the only copy of utterance 1: used
    wav(test / "dia0_utt2.wav", 0.8)
    wav(test / "final_videos_testdia9_utt9.wav", 0.5)  # twin of no row: counted
    manifest, report = run_collect(tmp_path, [{"name": "meld", "root": str(root)}])
    assert sorted(manifest) == ["meld-test-dia0_utt0", "meld-test-dia0_utt1", "meld-test-dia0_utt2"]
    assert manifest["meld-test-dia0_utt0"]["audio_path"].endswith("/dia0_utt0.wav")
    assert manifest["meld-test-dia0_utt1"]["audio_path"].endswith("/final_videos_testdia0_utt1.wav")
    assert report["scan"]["meld"]["skipped"] == {"meld_test_twin": 2}


def test_5_shortfall_is_redistributed_within_the_domain():
    pools = {n: [{"id": f"{n}-{i}"} for i in range(k)] for n, k in {"a": 5, "b": 22, "c": 100, "m": 100}.items()}
    specs = [SourceSpec(name="a", root="x", ratio=0.2), SourceSpec(name="b", root="x", ratio=0.2),
             SourceSpec(name="c", root="x", ratio=0.4), SourceSpec(name="m", root="x", ratio=0.2)]
    domains = {"a": "sound", "b": "sound", "c": "sound", "m": "music"}
    # a lacks 15 of its 20: b (ratio .2) and c (.4) take them 1:2, but b has only 2 spare: c takes the rest
    chosen, summary = sample_mixture(pools, specs, 100, seed=0, shortfall="redistribute", domains=domains)
    assert {n: (row["wanted"], row["moved"], row["selected"], row["shortfall"]) for n, row in summary.items()} == {
        "a": (20, -15, 5, 15), "b": (20, 2, 22, 0), "c": (40, 13, 53, 0), "m": (20, 0, 20, 0)}
    assert len(chosen) == 100
    pools["b"] = pools["b"][:20]  # no spare at b: c alone takes the 15 (ratios among receivers only)
    _, summary = sample_mixture(pools, specs, 100, seed=0, shortfall="redistribute", domains=domains)
    assert [summary[n]["moved"] for n in "abcm"] == [-15, 0, 15, 0]
    _, reported = sample_mixture(pools, specs, 100, seed=0)  # the default rule only reports
    assert [reported[n]["selected"] for n in "abcm"] == [5, 20, 40, 20]
    with pytest.raises(DataError, match="shortfall=error: sources with fewer usable clips than asked: a 5 of 20"):
        sample_mixture(pools, specs, 100, seed=0, shortfall="error", domains=domains)
    with pytest.raises(ValueError, match="shortfall"):
        DataPrepConfig(shortfall="spread")


def test_6_duplicate_audio_removed_across_and_within_sources(tmp_path):
    audioset = fixture(tmp_path, "audioset")
    speech = ogg(audioset / "audio" / "Speech" / "--PJHxphWEs_30.0-40.0.ogg", 2.0)
    audiocaps = tmp_path / "audiocaps"
    write_csv(audiocaps / "train.csv", ["audiocap_id", "youtube_id", "start_time", "caption"],
              [["91139", "--PJHxphWEs", "30", "A man speaks as a dog barks"]])
    (audiocaps / "audio").mkdir()
    shutil.copy(speech, audiocaps / "audio" / "--PJHxphWEs_30.ogg")  # the same segment, the same bytes
    covost = fixture(tmp_path, "covost2")  # en_de and en_tr both name common_voice_en_18.mp3
    mp3(covost / "clips" / "common_voice_en_18.mp3", 1.0)
    mp3(covost / "clips" / "common_voice_en_19.mp3", 1.2)
    musicbench = tmp_path / "musicbench"
    musicbench.mkdir()
    row = {"location": "data/-0SdAVK79lg_1.wav", "main_caption": "A mellow piano ballad."}
    (musicbench / "MusicBench_train.json").write_text(json.dumps(dict(row, location="data/a.wav")) + "\n"
                                                      + json.dumps(dict(row, location="data/b.wav")) + "\n")
    (musicbench / "MusicBench_test_A.json").write_text(json.dumps(row) + "\n")
    (musicbench / "MusicBench_test_B.json").write_text(json.dumps(row) + "\n")
    wav(musicbench / "datashare" / "data" / "-0SdAVK79lg_1.wav", 1.0)
    wav(musicbench / "datashare" / "data" / "a.wav", 1.0)  # same size as b.wav, other content: both kept
    wav(musicbench / "datashare" / "data" / "b.wav", 1.0)
    sources = [{"name": n, "root": str(tmp_path / n)} for n in ("audioset", "audiocaps", "covost2", "musicbench")]
    manifest, report = run_collect(tmp_path, sources)
    assert sorted(manifest) == ["audioset---PJHxphWEs_30", "covost2-en_de-common_voice_en_18", "covost2-en_de-common_voice_en_19",
                                "musicbench-test_A-data--0SdAVK79lg_1", "musicbench-train-data-a", "musicbench-train-data-b"]
    assert {n: report["scan"][n]["duplicates"] for n in report["scan"]} == {
        "audioset": {"removed": 0, "kept_in": {}}, "audiocaps": {"removed": 1, "kept_in": {"audioset": 1}},
        "covost2": {"removed": 1, "kept_in": {"covost2": 1}}, "musicbench": {"removed": 1, "kept_in": {"musicbench": 1}}}
    assert report["mixture"]["audiocaps"]["available"] == 0
    write_card(tmp_path / "work")
    markdown = (tmp_path / "work" / "data_card.md").read_text()
    assert "| audiocaps | 0 | 0 | +0 | 0 | 0 | 1 (kept in audioset: 1) | - | - |" in markdown


@pytest.mark.parametrize("text, ident", [
    ("http://creativecommons.org/licenses/by-nc/3.0/", "CC-BY-NC-3.0"),
    ("http://creativecommons.org/publicdomain/zero/1.0/", "CC0-1.0"),
    ("Attribution-NonCommercial-ShareAlike 3.0 International", "CC-BY-NC-SA-3.0"),
    ("Attribution-Noncommercial-No Derivative Works 3.0 United States", "CC-BY-NC-ND-3.0"),
    ("Attribution 4.0 International", "CC-BY-4.0"), ("CC BY-NC 4.0", "CC-BY-NC-4.0"), ("CC BY-SA 3.0 (MusicBench)", "CC-BY-SA-3.0"),
    ("Creative Commons 0", "CC0-1.0"), ("MIT", "MIT"), ("YouTube-ToS", "YouTube-ToS"),
    ("Attribution", None), ("FMA-Limited: Download Only", None), ("", None), (None, None),
])
def test_7_licence_ids(text, ident):
    assert licence_id(text) == ident


def test_7_licence_gate_stops_or_drops_with_counts(tmp_path):
    root = tmp_path / "fma"
    (root / "fma_metadata").mkdir(parents=True)
    (root / "fma_metadata" / "tracks.csv").write_text(
        ",artist,set,set,track,track,track,track\n,name,split,subset,genre_top,genres_all,license,title\ntrack_id,,,,,,,\n"
        "2,AWOL,training,small,Hip-Hop,[21],Attribution-NonCommercial-ShareAlike 3.0 International,Food\n"
        "5,AWOL,training,small,Rock,[12],Attribution 4.0 International,This World\n"
        "10,Kurt,training,small,Pop,[10],,Freeway\n")
    for track in (2, 5, 10):
        mp3(root / "fma_small" / "000" / f"{track:06d}.mp3", 1.0)
    sources = [{"name": "fma", "root": str(root)}]
    with pytest.raises(DataError, match=r"licence gate: .* fma: CC-BY-NC-SA-3.0 x1, unknown x1 \(accept the id"):
        run_collect(tmp_path, sources, licences=["CC-BY-4.0"])
    manifest, report = run_collect(tmp_path, sources, licences=["CC-BY-4.0"], unaccepted="drop")
    assert sorted(manifest) == ["fma-000005"] and manifest["fma-000005"]["licence_id"] == "CC-BY-4.0"
    assert report["scan"]["fma"]["licence_refused"] == {"CC-BY-NC-SA-3.0": 1, "unknown": 1}
    manifest, _ = run_collect(tmp_path, [dict(sources[0], licence="CC BY-NC-SA 3.0")], licences=["CC-BY-NC-SA-3.0"])
    assert len(manifest) == 3  # a recipe licence stands for every clip and is read for its id


def test_7_cogito_recipe_accepts_every_dataset_licence():
    """A full run of recipes/cogito_data.yaml passes its own gate and the audit's rule (no licence 'unknown...')."""
    recipe = load_recipe(REPO / "recipes" / "cogito_data.yaml")
    assert recipe.data_prep.unaccepted == "error"
    for spec in recipe.data_prep.sources:
        adapter = ADAPTERS[spec.name]
        assert not adapter.licence.lower().startswith("unknown") and spec.licence is None
        assert adapter.licence_id in recipe.data_prep.licences or (adapter.licence_id is None and spec.name in ("clotho", "fma"))
    assert ADAPTERS["complexaudio"].licence_id == "MIT"


def test_8_every_skip_is_counted(tmp_path):
    talk = tmp_path / "dailytalk" / "data" / "0"
    talk.mkdir(parents=True)
    (talk / "0_1_d0.txt").write_text("Hi there.\n")
    wav(talk / "0_1_d0.wav", 1.0)
    wav(talk / "1_0_d0.wav", 1.0)  # no transcript
    (talk / "notes.txt").write_text("not a turn\n")  # off the naming pattern
    (talk / "2_1_d0.txt").write_bytes(b"caf\xe9 au lait\n")  # not UTF-8
    wav(talk / "2_1_d0.wav", 1.0)
    complexaudio = tmp_path / "complexaudio"
    wav(complexaudio / "a.wav", 1.0)
    wav(complexaudio / "b.wav", 1.1)
    (complexaudio / "metadata.jsonl").write_text(json.dumps({"audio": "a.wav", "domain": "speeech"}) + "\n"
                                                 + json.dumps({"audio": "b.wav"}) + "\n")
    musicbench = tmp_path / "musicbench"
    wav(musicbench / "datashare" / "data" / "x.wav", 1.0)
    (musicbench / "MusicBench_train.json").write_text('{"location": "data/x.wav", "main_caption": "ok"}\n{"location": "data/y.w\n')
    fma = tmp_path / "fma"
    (fma / "fma_metadata").mkdir(parents=True)
    (fma / "fma_metadata" / "tracks.csv").write_text(
        ",artist,set,set,track,track,track,track\n,name,split,subset,genre_top,genres_all,license,title\ntrack_id,,,,,,,\n"
        "2,AWOL,training,small,Hip-Hop,[21],Attribution 4.0 International,Food\n5,AWOL,training,sm\n")
    mp3(fma / "fma_small" / "000" / "000002.mp3", 1.0)
    sources = [{"name": n, "root": str(tmp_path / n)} for n in ("dailytalk", "complexaudio", "musicbench", "fma")]
    manifest, report = run_collect(tmp_path, sources)
    assert sorted(manifest) == ["complexaudio-b", "dailytalk-d0-0", "fma-000002", "musicbench-train-data-x"]
    assert {n: row["skipped"] for n, row in report["scan"].items()} == {
        "dailytalk": {"off_pattern_name": 1, "undecodable_text": 1, "wav_without_text": 1},
        "complexaudio": {"invalid_domain": 1}, "musicbench": {"bad_metadata": 1}, "fma": {"truncated_row": 1}}
    (musicbench / "MusicBench_train.json").write_text('{"location": "data/x.wav"}\nnot json\n{"location": "data/x.wav"}\n[1,\n')
    with pytest.raises(DataError, match=r"source musicbench: more than data_prep.max_bad_rows=1 .* the last: "
                                        r".*MusicBench_train.json:4 \(bad_metadata\)"):
        run_collect(tmp_path, [sources[2]], max_bad_rows=1)


def test_9_one_long_clip_rule_from_collect_to_training(tmp_path, synthetic_dir):
    assert DataConfig().max_audio_seconds is None and sample_limit(None) > 10**12 and sample_limit(2.0) == 32_000
    cogito, data = load_recipe(REPO / "recipes" / "cogito.yaml"), load_recipe(REPO / "recipes" / "cogito_data.yaml")
    assert cogito.data.max_audio_seconds == data.data.max_audio_seconds == 60
    assert memory.longest_clip(cogito).startswith("longest clip: data.max_audio_seconds=60 s = 780 audio tokens, fits in "
                                                  "data.max_length=8,192")
    whole = cogito.model_copy(deep=True)
    whole.data.max_audio_seconds = None
    assert "data.max_audio_seconds is null (whole clips, any length)" in memory.longest_clip(whole)
    with pytest.raises(RecipeError, match="max_seconds"):  # collect's bound is data.max_audio_seconds, not a second key
        load_recipe(REPO / "recipes" / "tiny.yaml", ["data_prep.max_seconds=30"])
    # collect drops the clips longer than data.max_audio_seconds, the length qa, cot and training then take whole
    work = tmp_path / "work"
    durations = sorted(sf.info(str(p)).duration for p in (synthetic_dir / "audio").glob("*.wav"))
    limit = float(np.median(durations))
    overrides = [f"data_prep.work_dir={work}", f"data_prep.sources=[{{name: synthetic, root: {synthetic_dir}}}]",
                 f"data.max_audio_seconds={limit}"]
    assert cli(["collect", str(REPO / "recipes" / "tiny.yaml"), *overrides]) == 0
    report = json.loads((work / "collect.report.json").read_text())
    manifest = [json.loads(line) for line in (work / "collect.jsonl").read_text().splitlines()]
    assert report["max_seconds"] == limit and report["rejected"]["too_long"] > 0
    assert manifest and all(r["duration"] <= limit for r in manifest) and len(manifest) == report["out"]
