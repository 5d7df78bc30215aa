import json
from collections import Counter

import numpy as np
import pytest
import soundfile as sf

from core.audio import load_audio
from core.items import MODALITIES, DataError, load_items

GOOD = {"id": "a", "audio_path": "./audio/a.wav", "question": "Q?", "choices": ["x", "y"], "answer": "x"}


def write(tmp_path, records, name="meta.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def wav_dir(tmp_path):
    (tmp_path / "audio").mkdir()
    sf.write(tmp_path / "audio" / "a.wav", np.zeros(1600, np.float32), 16000)
    sf.write(tmp_path / "audio" / "b.wav", np.zeros(1600, np.float32), 16000)
    return tmp_path


def test_real_mmar_metadata_loads(mmar_meta, mmar_facts):
    items = load_items(mmar_meta, check_audio=False)
    assert all(i.answer in i.choices for i in items)
    assert {i.modality for i in items} <= set(MODALITIES)
    # The whole benchmark, from its facts table (tests/data/mmar_facts.json, computed from the official file):
    # 1,000 records over exactly the seven modalities the loader knows; random guessing scores 29.33 %.
    assert mmar_facts["records"] == sum(mmar_facts["modality"].values()) == 1000
    assert set(mmar_facts["modality"]) == set(MODALITIES)
    chance = sum(count / int(n) for n, count in mmar_facts["choices"].items()) / mmar_facts["records"]
    assert 100 * chance == pytest.approx(mmar_facts["chance_accuracy_pct"], abs=0.01)
    assert mmar_facts["chance_accuracy_pct"] == 29.33  # docs/protocol.md: random guessing
    if len(items) == mmar_facts["records"]:  # MMAR_META gave the whole file: it must be the one tabled
        assert Counter(i.modality for i in items) == Counter(mmar_facts["modality"])
        assert 100 * np.mean([1 / len(i.choices) for i in items]) == pytest.approx(29.33, abs=0.01)
    else:  # the sample covers every modality, category and sub-category
        raw = [json.loads(line) for line in mmar_meta.read_text(encoding="utf-8").splitlines()]
        assert {r["modality"] for r in raw} == set(mmar_facts["modality"])
        assert {r["category"] for r in raw} == set(mmar_facts["category"])
        assert {r["sub-category"] for r in raw} == set(mmar_facts["sub-category"])


def test_good_records_resolve_audio(wav_dir):
    items = load_items(write(wav_dir, [GOOD, {**GOOD, "id": "b", "audio_path": "audio/b.wav"}]))
    assert [i.audio_path.name for i in items] == ["a.wav", "b.wav"]
    assert items[0].load_audio().shape == (1600,)


@pytest.mark.parametrize(
    "record, message",
    [
        ({**GOOD, "answer": "z"}, r"meta.jsonl:1 \(id=a\): answer: 'z' is not one of its choices"),
        ({**GOOD, "audio_path": "./audio/missing.wav"}, r"meta.jsonl:1 \(id=a\): audio_path: file not found"),
        ({k: v for k, v in GOOD.items() if k != "question"}, r"\(id=a\): question: missing"),
        ({**GOOD, "choices": "x"}, r"\(id=a\): choices: expected a list"),
        ("{not json", r"meta.jsonl:1: not valid JSON"),
    ],
)
def test_bad_records_name_file_record_and_field(wav_dir, record, message):
    with pytest.raises(DataError, match=message):
        load_items(write(wav_dir, [record]))


def test_duplicate_id_names_both_lines(wav_dir):
    with pytest.raises(DataError, match=r"meta.jsonl:2 \(id=a\): id: duplicate of line 1"):
        load_items(write(wav_dir, [GOOD, GOOD]))


def test_unreadable_wav_names_the_record(wav_dir):
    (wav_dir / "audio" / "a.wav").write_bytes(b"RIFF....not audio")
    items = load_items(write(wav_dir, [GOOD]))
    with pytest.raises(DataError, match=r"\(id=a\): audio_path: .*a.wav: cannot decode audio"):
        items[0].load_audio()


def test_missing_meta_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_items(tmp_path / "nope.jsonl")


def test_sft_files_require_thinking(wav_dir):
    with pytest.raises(DataError, match=r"thinking: missing"):
        load_items(write(wav_dir, [GOOD]), require_thinking=True)


def test_audio_is_resampled_to_16k_mono(tmp_path):
    t = np.arange(44_100) / 44_100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], axis=1).astype(np.float32)
    sf.write(tmp_path / "s.wav", stereo, 44_100)
    wave = load_audio(tmp_path / "s.wav")
    assert wave.dtype == np.float32 and wave.ndim == 1 and abs(wave.size - 16_000) <= 1
    assert load_audio(tmp_path / "s.wav", max_seconds=0.5).size == 8_000
