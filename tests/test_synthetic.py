import hashlib
from pathlib import Path

import numpy as np
import pytest

from core.items import load_items
from core.qwen_omni import SAMPLE_RATE
from data_prep.synthetic import CONTOUR_CAPTIONS, NUMBER_WORDS, TASKS, generate


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    generate(tmp_path / "a", train=6, test=6, seed=3)
    generate(tmp_path / "b", train=6, test=6, seed=3)
    generate(tmp_path / "c", train=6, test=6, seed=4)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_splits_never_share_a_clip(synthetic_dir):
    train = load_items(synthetic_dir / "train.jsonl")
    test = load_items(synthetic_dir / "test.jsonl")
    assert not {i.id for i in train} & {i.id for i in test}
    assert not {i.audio_path for i in train} & {i.audio_path for i in test}
    hashes = lambda items: {hashlib.sha256(i.audio_path.read_bytes()).hexdigest() for i in items}
    assert not hashes(train) & hashes(test)


def test_records_follow_the_mmar_schema(synthetic_dir):
    items = load_items(synthetic_dir / "test.jsonl")
    assert {i.meta["sub-category"] for i in items} == {t.sub_category for t in TASKS.values()}
    for item in items:
        assert item.answer in item.choices and item.thinking and item.meta["cue"]
        assert len(item.meta["rubric"]) == 5
        assert all(set(c) == {"name", "scoring_point", "note", "choices"} and c["choices"] == [0, 1] for c in item.meta["rubric"])
        wave = item.load_audio()
        assert 0.8 < wave.size / SAMPLE_RATE < 3.5


def onsets(wave: np.ndarray, frame: int = 160, threshold: float = 0.05) -> list[float]:
    """Rising edges of the frame RMS: an independent beep detector."""
    rms = np.sqrt(np.mean(wave[: wave.size // frame * frame].reshape(-1, frame) ** 2, axis=1))
    active = rms > threshold
    rising = np.flatnonzero(active[1:] & ~active[:-1]) + 1
    return [r * frame / SAMPLE_RATE for r in rising]


def segment_features(wave: np.ndarray) -> list[tuple[float, float, float]]:
    """(duration s, rms, dominant Hz) of each sounding segment."""
    frame = 160
    rms = np.sqrt(np.mean(wave[: wave.size // frame * frame].reshape(-1, frame) ** 2, axis=1))
    active = np.concatenate([[False], rms > 0.02, [False]])
    starts, ends = np.flatnonzero(active[1:] & ~active[:-1]), np.flatnonzero(~active[1:] & active[:-1])
    out = []
    for s, e in zip(starts, ends):
        seg = wave[s * frame: e * frame]
        spectrum = np.abs(np.fft.rfft(seg))
        out.append(((e - s) * frame / SAMPLE_RATE, float(np.sqrt(np.mean(seg**2))), float(np.argmax(spectrum) * SAMPLE_RATE / seg.size)))
    return out


@pytest.fixture(scope="module")
def items(synthetic_dir):
    return load_items(synthetic_dir / "train.jsonl") + load_items(synthetic_dir / "test.jsonl")


def by_task(items, name):
    chosen = [i for i in items if i.id.endswith(name)]
    assert chosen, name
    return chosen


def test_beep_count_matches_detected_onsets(items):
    for item in by_task(items, "beep_count"):
        detected = onsets(item.load_audio())
        assert NUMBER_WORDS[len(detected) - 1] == item.answer, item.id
        assert np.allclose(detected, item.meta["facts"]["onsets"], atol=0.02)


def test_pitch_loudness_and_duration_are_audible(items):
    for item in by_task(items, "pitch_compare"):
        (_, _, f1), (_, _, f2) = segment_features(item.load_audio())
        assert (f1 > f2) == (item.answer == "the first tone"), item.id
    for item in by_task(items, "loudness_compare"):
        (_, r1, _), (_, r2, _) = segment_features(item.load_audio())
        assert (r2 > r1) == (item.answer == "louder"), item.id
    for item in by_task(items, "duration_compare"):
        (d1, _, _), (d2, _, _) = segment_features(item.load_audio())
        assert (d1 > d2) == (item.answer == "the first tone"), item.id


def test_melody_and_order_are_audible(items):
    for item in by_task(items, "melody_contour"):
        pitches = [f for _, _, f in segment_features(item.load_audio())]
        assert len(pitches) == 4
        steps = np.sign(np.diff(pitches))
        expected = {"upward": [1, 1, 1], "downward": [-1, -1, -1], "up then down": [1, 1, -1]}[item.answer]
        assert steps.tolist() == expected, item.id
    for item in by_task(items, "sound_order"):
        wave = item.load_audio()
        first = wave[int(0.1 * SAMPLE_RATE): int(0.6 * SAMPLE_RATE)]
        # a pure tone concentrates its energy in one FFT bin; noise spreads it
        spectrum = np.abs(np.fft.rfft(first)) ** 2
        tonal = spectrum.max() / spectrum.sum() > 0.2
        assert tonal == (item.answer == "a pure tone"), item.id


def test_captions_say_what_is_heard_and_the_reasoning_rests_on_them(items):
    for item in items:
        facts, caption = item.meta["facts"], item.meta["caption"]
        assert item.thinking == f'I hear {caption}, so the answer is "{item.answer}".'
        task = item.id.rsplit("-", 1)[-1]
        heard = {
            "beep_count": lambda: caption.startswith(NUMBER_WORDS[facts["count"] - 1] + " short beep"),
            "pitch_compare": lambda: caption.startswith("a higher") == (facts["freqs"][0] > facts["freqs"][1]),
            "sound_order": lambda: caption.startswith("a pure tone") == facts["tone_first"],
            "loudness_compare": lambda: caption.startswith("a faint") == (facts["gain_db"] > 0),
            "melody_contour": lambda: caption == CONTOUR_CAPTIONS[item.answer],
            "duration_compare": lambda: caption.startswith("a long") == (facts["durations"][0] > facts["durations"][1]),
        }[task]
        assert heard(), (item.id, caption, facts)


def test_pretrain_split_has_its_own_clips_and_leaves_the_others_unchanged(tmp_path):
    generate(tmp_path / "a", train=6, test=6, seed=0)
    generate(tmp_path / "b", train=6, test=6, seed=0, pretrain=12)
    for split in ("train", "test"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
    pretrain = load_items(tmp_path / "b" / "pretrain.jsonl")
    others = load_items(tmp_path / "b" / "train.jsonl") + load_items(tmp_path / "b" / "test.jsonl")
    hashes = lambda chosen: {hashlib.sha256(i.audio_path.read_bytes()).hexdigest() for i in chosen}
    assert len(hashes(pretrain)) == 12 and not hashes(pretrain) & hashes(others)
    # the tasks take turns: every split is balanced across them
    assert sorted(i.meta["sub-category"] for i in pretrain) == sorted(2 * [t.sub_category for t in TASKS.values()])


def test_hard_split_leaves_the_default_split_unchanged_and_has_its_own_clips(tmp_path):
    from data_prep.synthetic import HARD_TASKS

    generate(tmp_path / "easy", train=8, test=4, seed=0)
    generate(tmp_path / "hard", train=8, test=4, seed=0, hard=True)
    hard = load_items(tmp_path / "hard" / "train.jsonl") + load_items(tmp_path / "hard" / "test.jsonl")
    easy = load_items(tmp_path / "easy" / "train.jsonl") + load_items(tmp_path / "easy" / "test.jsonl")
    assert sorted({i.id.rsplit("-", 1)[-1] for i in hard}) == sorted(HARD_TASKS)
    hashes = lambda chosen: {hashlib.sha256(i.audio_path.read_bytes()).hexdigest() for i in chosen}
    assert len(hashes(hard)) == 12 and not hashes(hard) & hashes(easy)
    assert all(i.id.startswith("syn-hard-") for i in hard)


@pytest.fixture(scope="module")
def hard_items(tmp_path_factory):
    out = tmp_path_factory.mktemp("hard")
    generate(out, train=48, test=0, seed=0, hard=True)
    return load_items(out / "train.jsonl")


def test_hard_answers_combine_the_heard_facts(hard_items):
    from data_prep.synthetic import ORDINALS

    for item in by_task(hard_items, "longer_is_louder"):
        (d1, r1, _), (d2, r2, _) = segment_features(item.load_audio())
        longer, louder = int(d2 > d1), int(r2 > r1)
        assert item.answer == ("yes" if longer == louder else "no"), item.id
        assert f"the {ORDINALS[longer]} tone is the longer one; the {ORDINALS[louder]} tone is the louder one" in item.thinking.lower()
    for item in by_task(hard_items, "melody_ends_higher"):
        pitches = [f for _, _, f in segment_features(item.load_audio())]
        assert len(pitches) == 4 and item.answer == ("yes" if pitches[-1] > pitches[0] else "no"), item.id
        assert item.meta["caption"] in CONTOUR_CAPTIONS.values()  # the contour in the words the tiny base heard
    for item in by_task(hard_items, "odd_note"):
        pitches = [f for _, _, f in segment_features(item.load_audio())]
        falls = [k for k in range(1, 5) if pitches[k] < pitches[k - 1]]
        assert len(falls) == 1 and item.answer == f"the {ORDINALS[falls[0]]} note", item.id
        # the neighbours of the falling note are among the choices: a step off by one names them
        assert {f"the {ORDINALS[k]} note" for k in (falls[0] - 1, falls[0] + 1) if 1 <= k <= 4} <= set(item.choices)
    for item in by_task(hard_items, "louder_pitch"):
        (_, r1, f1), (_, r2, f2) = segment_features(item.load_audio())
        louder_is_higher = (f1 > f2) == (r1 > r2)
        assert item.answer == ("higher" if louder_is_higher else "lower"), item.id
    # the up-then-down melodies end above their start: "no", what taking the final fall for the whole gives, is wrong
    rising_then_falling = [i for i in by_task(hard_items, "melody_ends_higher") if i.meta["facts"]["semitones"] == [0, 4, 7, 2]]
    assert rising_then_falling and {i.answer for i in rising_then_falling} == {"yes"}
    assert {i.answer for i in by_task(hard_items, "longer_is_louder")} == {"yes", "no"}
