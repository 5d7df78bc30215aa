"""A synthetic audio-reasoning benchmark in the MMAR schema, answerable from the signal alone.

    python -m data_prep.synthetic artifacts/synthetic --train 96 --test 48 --seed 0

Writes `train.jsonl`, `test.jsonl` and `audio/<id>.wav` (16 kHz mono, 1-3 s). Every record has
the MMAR fields (choices, answer, modality, category, sub-category, a reference `thinking`, `cue`
and a 5-criterion `rubric`). The same seed gives byte-identical files; each clip belongs to one
record of one split. It is the embedded default dataset of the demo and the tests.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from infer.audio import write_wav
from infer.qwen_omni import SAMPLE_RATE

NUMBER_WORDS = ["one", "two", "three", "four", "five"]
SPLITS = ("train", "test")
MIN_SECONDS = 1.0


@dataclass
class Clip:
    wave: np.ndarray
    question: str
    choices: list[str]
    answer: str
    thinking: str
    cue: list[str]
    facts: dict  # ground truth of the signal (beep onsets, frequencies, ...) for tests and probes


def tone(freq: float, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    ramp = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)  # 10 ms fades: no clicks, clean onsets
    return (amplitude * ramp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)


def pad_to_min_length(wave: np.ndarray, seconds: float = MIN_SECONDS) -> np.ndarray:
    """Trailing silence up to `seconds`: the thinker's audio tower pads a clip's last 1 s chunk to
    the longest chunk in the batch, so only clips of 1 s or more encode the same alone and batched."""
    return np.concatenate([wave, silence(max(0.0, seconds - wave.size / SAMPLE_RATE))])


def mix_noise_floor(wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (wave + 0.003 * rng.standard_normal(wave.size)).astype(np.float32)


def beep_count(rng: np.random.Generator) -> Clip:
    count = int(rng.integers(1, 6))
    freq = float(rng.choice([660.0, 880.0, 1000.0]))
    parts, onsets, cursor = [silence(0.2)], [], 0.2
    for _ in range(count):
        beep_len, gap = float(rng.uniform(0.08, 0.14)), float(rng.uniform(0.15, 0.25))
        onsets.append(round(cursor, 3))
        parts += [tone(freq, beep_len), silence(gap)]
        cursor += beep_len + gap
    parts.append(silence(0.2))
    options = sorted(rng.choice([n for n in range(1, 6) if n != count], size=3, replace=False).tolist() + [count])
    word = NUMBER_WORDS[count - 1]
    return Clip(
        wave=np.concatenate(parts), question="How many beeps can you hear in this clip?",
        choices=[NUMBER_WORDS[n - 1] for n in options], answer=word,
        thinking=f"The clip holds short tonal beeps at about {int(freq)} Hz separated by silences. "
                 f"Counting each onset in turn gives {word} beep{'s' if count > 1 else ''}, so the answer is {word}.",
        cue=["beep onsets", "silent gaps"], facts={"count": count, "onsets": onsets, "freq": freq},
    )


def pitch_compare(rng: np.random.Generator) -> Clip:
    low = float(rng.uniform(220, 440))
    high = low * 2 ** (float(rng.integers(4, 13)) / 12)
    first_high = bool(rng.integers(0, 2))
    f1, f2 = (high, low) if first_high else (low, high)
    answer = "the first tone" if first_high else "the second tone"
    return Clip(
        wave=np.concatenate([silence(0.1), tone(f1, 0.5), silence(0.3), tone(f2, 0.5), silence(0.1)]),
        question="Which tone is higher in pitch?", choices=["the first tone", "the second tone"], answer=answer,
        thinking=f"There are two steady tones. The first sits near {int(f1)} Hz and the second near {int(f2)} Hz, "
                 f"so {answer} is the higher one.",
        cue=["two tones", "pitch difference"], facts={"freqs": [f1, f2]},
    )


def sound_order(rng: np.random.Generator) -> Clip:
    noise = (0.3 * rng.standard_normal(int(0.5 * SAMPLE_RATE))).astype(np.float32)
    pure = tone(float(rng.uniform(300, 900)), 0.5)
    tone_first = bool(rng.integers(0, 2))
    first, second = (pure, noise) if tone_first else (noise, pure)
    answer = "a pure tone" if tone_first else "a burst of noise"
    other = "a burst of noise" if tone_first else "a pure tone"
    return Clip(
        wave=np.concatenate([silence(0.1), first, silence(0.3), second, silence(0.1)]),
        question="Which sound comes first?", choices=["a pure tone", "a burst of noise"], answer=answer,
        thinking=f"The clip opens with {answer} and is followed, after a short pause, by {other}. "
                 f"So {answer} comes first.",
        cue=["pure tone", "noise burst", "temporal order"], facts={"tone_first": tone_first},
    )


def loudness_compare(rng: np.random.Generator) -> Clip:
    freq = float(rng.uniform(300, 900))
    louder = bool(rng.integers(0, 2))
    gain_db = float(rng.uniform(9, 15)) * (1 if louder else -1)
    base = 0.25
    second_amp = base * 10 ** (gain_db / 20)
    answer = "louder" if louder else "softer"
    return Clip(
        wave=np.concatenate([silence(0.1), tone(freq, 0.5, base), silence(0.3), tone(freq, 0.5, second_amp), silence(0.1)]),
        question="Is the second tone louder or softer than the first?", choices=["louder", "softer"], answer=answer,
        thinking=f"Both tones share the same pitch. The second one is about {abs(gain_db):.0f} dB "
                 f"{'stronger' if louder else 'weaker'} than the first, so it is {answer}.",
        cue=["same pitch", "level difference"], facts={"gain_db": gain_db},
    )


def melody_contour(rng: np.random.Generator) -> Clip:
    shape = str(rng.choice(["upward", "downward", "up then down"]))
    root = float(rng.uniform(220, 330))
    steps = {"upward": [0, 2, 4, 7], "downward": [7, 4, 2, 0], "up then down": [0, 4, 7, 2]}[shape]
    notes = [tone(root * 2 ** (s / 12), 0.25) for s in steps]
    wave = np.concatenate([silence(0.1)] + [np.concatenate([n, silence(0.05)]) for n in notes] + [silence(0.1)])
    return Clip(
        wave=wave, question="How does the melody move?", choices=["upward", "downward", "up then down"], answer=shape,
        thinking=f"Four notes are played one after another. Following their pitches from the first to the last, "
                 f"the line moves {shape}.",
        cue=["four notes", "pitch contour"], facts={"semitones": steps},
    )


def duration_compare(rng: np.random.Generator) -> Clip:
    short, long = float(rng.uniform(0.2, 0.35)), float(rng.uniform(0.7, 1.0))
    first_long = bool(rng.integers(0, 2))
    d1, d2 = (long, short) if first_long else (short, long)
    freq = float(rng.uniform(300, 900))
    answer = "the first tone" if first_long else "the second tone"
    return Clip(
        wave=np.concatenate([silence(0.1), tone(freq, d1), silence(0.3), tone(freq, d2), silence(0.1)]),
        question="Which tone lasts longer?", choices=["the first tone", "the second tone"], answer=answer,
        thinking=f"The first tone lasts about {d1:.1f} s and the second about {d2:.1f} s, so {answer} lasts longer.",
        cue=["two tones", "duration difference"], facts={"durations": [d1, d2]},
    )


@dataclass(frozen=True)
class Task:
    make: Callable[[np.random.Generator], Clip]
    modality: str
    category: str
    sub_category: str
    skill: str  # what the rubric's perception criterion checks


TASKS = {
    "beep_count": Task(beep_count, "sound", "Perception Layer", "Counting", "counts the beeps"),
    "pitch_compare": Task(pitch_compare, "music", "Signal Layer", "Pitch Comparison", "compares the two pitches"),
    "sound_order": Task(sound_order, "sound", "Perception Layer", "Temporal Order", "orders the two sounds in time"),
    "loudness_compare": Task(loudness_compare, "sound", "Signal Layer", "Loudness Comparison", "compares the two levels"),
    "melody_contour": Task(melody_contour, "music", "Perception Layer", "Melodic Contour", "follows the pitch contour"),
    "duration_compare": Task(duration_compare, "sound", "Signal Layer", "Duration Comparison", "compares the two durations"),
}


def rubric(task: Task, clip: Clip) -> list[dict]:
    criteria = [
        (f"Cue Identification: {clip.cue[0]}", f"Award 1 point if the reasoning identifies the {clip.cue[0]}."),
        (f"Cue Identification: {clip.cue[-1]}", f"Award 1 point if the reasoning identifies the {clip.cue[-1]}."),
        ("Perceptual Analysis", f"Award 1 point if the reasoning correctly {task.skill}."),
        ("Logical Consistency", "Award 1 point if the conclusion follows from the described evidence."),
        ("Answer Justification", f"Award 1 point if the reasoning explicitly supports the answer '{clip.answer}'."),
    ]
    return [{"name": n, "scoring_point": p, "note": "Synthetic item.", "choices": [0, 1]} for n, p in criteria]


def make_record(split: str, index: int, task_name: str, clip: Clip) -> dict:
    task = TASKS[task_name]
    rid = f"syn-{split}-{index:05d}-{task_name}"
    return {
        "id": rid, "audio_path": f"./audio/{rid}.wav", "question": clip.question, "choices": clip.choices,
        "answer": clip.answer, "modality": task.modality, "category": task.category,
        "sub-category": task.sub_category, "language": None, "source": "synthetic", "url": "", "timestamp": "",
        "thinking": clip.thinking, "cue": clip.cue, "rubric": rubric(task, clip), "facts": clip.facts,
    }


def generate_split(out_dir: Path, split: str, count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    names = list(TASKS)
    records = []
    for index in range(count):
        task_name = names[index % len(names)]
        clip = TASKS[task_name].make(rng)
        record = make_record(split, index, task_name, clip)
        write_wav(out_dir / record["audio_path"], mix_noise_floor(pad_to_min_length(clip.wave), rng))
        records.append(record)
    with (out_dir / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return records


def generate(out_dir: str | Path, train: int = 96, test: int = 48, seed: int = 0) -> dict[str, list[dict]]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {split: generate_split(out, split, n, seed) for split, n in zip(SPLITS, (train, test))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="artifacts/synthetic")
    parser.add_argument("--train", type=int, default=96)
    parser.add_argument("--test", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    splits = generate(args.out_dir, args.train, args.test, args.seed)
    print(f"synthetic benchmark: {', '.join(f'{k}={len(v)}' for k, v in splits.items())} records in {args.out_dir}")


if __name__ == "__main__":
    main()
