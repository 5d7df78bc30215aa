"""Linear probes on an audio encoder's pooled features, to compare encoders before and after fine-tuning.

    python -m encoder.probe --encoder runs/tiny/audio_encoder --data artifacts/synthetic

For every synthetic task the label comes from the clip's ground truth (`facts`), not from the
question: beep count (5 classes), which tone is higher, which sound is first, louder or softer,
melodic contour (3 classes), which tone is longer. Each clip is pooled into the mean of its frames
and the means of its first and second halves (so order survives pooling); a ridge-regression
probe on standardised features is fitted on train.jsonl and scored on test.jsonl, beside the
majority class of the training labels. Prints a table; `--out` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from core.items import Item, load_items
from encoder.audio_encoder import QwenOmniAudioEncoder

# Task name -> label of one record from its `facts` (None when the record belongs to another task).
PROBE_TASKS: dict[str, Callable[[dict], object]] = {
    "beep_count": lambda facts: facts.get("count"),
    "pitch_compare": lambda facts: None if "freqs" not in facts else facts["freqs"][0] > facts["freqs"][1],
    "sound_order": lambda facts: facts.get("tone_first"),
    "loudness_compare": lambda facts: None if "gain_db" not in facts else facts["gain_db"] > 0,
    "melody_contour": lambda facts: None if "semitones" not in facts else tuple(facts["semitones"]),
    "duration_compare": lambda facts: None if "durations" not in facts else facts["durations"][0] > facts["durations"][1],
}


def pooled_features(encoder: QwenOmniAudioEncoder, items: list[Item], batch_size: int = 8) -> np.ndarray:
    """[N, 3*D]: mean over all frames, over the first half and over the second half of each clip."""
    waves = [item.load_audio() for item in items]
    order = np.argsort([len(w) for w in waves])  # similar lengths together: less padding
    pooled = np.zeros((len(items), 3 * encoder.output_dim), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(waves[r]) for r in rows)
        audio = torch.zeros(len(rows), width)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for slot, row in enumerate(rows):
            audio[slot, : len(waves[row])] = torch.from_numpy(waves[row])
            mask[slot, : len(waves[row])] = 1
        with torch.inference_mode():
            features, frame_mask = encoder(audio, mask)
        for slot, row in enumerate(rows):
            frames = features[slot, : int(frame_mask[slot].sum())].cpu().numpy()
            half = (len(frames) + 1) // 2
            second = frames[half:] if len(frames) > 1 else frames
            pooled[row] = np.concatenate([frames.mean(0), frames[:half].mean(0), second.mean(0)])
    return pooled


def ridge_probe(train_x: np.ndarray, train_y: list, test_x: np.ndarray, ridge: float = 0.1) -> list:
    """One-vs-rest ridge regression on standardised features, solved in the dual (few clips, many dims)."""
    classes = sorted(set(train_y), key=repr)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x, z = (train_x - mean) / std, (test_x - mean) / std
    targets = np.array([[1.0 if y == c else -1.0 for c in classes] for y in train_y])
    gram = x @ x.T
    # `ridge` is relative to the mean squared norm of a clip's features, so it does not depend on D.
    alpha = np.linalg.solve(gram + ridge * np.trace(gram) / len(x) * np.eye(len(x)), targets - targets.mean(0))
    scores = z @ (x.T @ alpha) + targets.mean(0)
    return [classes[i] for i in scores.argmax(1)]


def majority(train_y: list, test_y: list) -> float:
    labels, counts = np.unique([repr(y) for y in train_y], return_counts=True)
    top = labels[counts.argmax()]
    return float(np.mean([repr(y) == top for y in test_y]))


def run_probe(encoder_path: str | Path, data_dir: str | Path, ridge: float = 0.1, batch_size: int = 8) -> list[dict]:
    """One row per task: class count, split sizes, majority-class and probe accuracy on the test split."""
    encoder = QwenOmniAudioEncoder(encoder_path)
    data_dir = Path(data_dir)
    splits = {split: load_items(data_dir / f"{split}.jsonl") for split in ("train", "test")}
    features = {split: pooled_features(encoder, items, batch_size) for split, items in splits.items()}
    rows = []
    for task, label_of in PROBE_TASKS.items():
        picked = {
            split: [(i, label_of(item.meta.get("facts", {}))) for i, item in enumerate(items)]
            for split, items in splits.items()
        }
        picked = {split: [(i, y) for i, y in pairs if y is not None] for split, pairs in picked.items()}
        if not picked["train"] or not picked["test"]:
            continue
        train_idx, train_y = zip(*picked["train"])
        test_idx, test_y = zip(*picked["test"])
        if len(set(train_y)) < 2:
            predicted = [train_y[0]] * len(test_y)
        else:
            predicted = ridge_probe(features["train"][list(train_idx)], list(train_y), features["test"][list(test_idx)], ridge)
        rows.append({
            "task": task, "classes": len(set(train_y) | set(test_y)), "train": len(train_y), "test": len(test_y),
            "majority": majority(list(train_y), list(test_y)),
            "probe": float(np.mean([p == y for p, y in zip(predicted, test_y)])),
        })
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'task':<18} {'classes':>7} {'train':>5} {'test':>5} {'majority':>8} {'probe':>6}"]
    for row in rows:
        lines.append(
            f"{row['task']:<18} {row['classes']:>7} {row['train']:>5} {row['test']:>5} "
            f"{row['majority']:>8.3f} {row['probe']:>6.3f}"
        )
    mean_majority = np.mean([r["majority"] for r in rows])
    mean_probe = np.mean([r["probe"] for r in rows])
    lines.append(f"{'mean':<18} {'':>7} {'':>5} {'':>5} {mean_majority:>8.3f} {mean_probe:>6.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", required=True, help="exported encoder folder or Qwen3-Omni checkpoint")
    parser.add_argument("--data", default="artifacts/synthetic", help="folder with train.jsonl and test.jsonl")
    parser.add_argument("--ridge", type=float, default=0.1, help="ridge strength, relative to the mean squared feature norm")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = run_probe(args.encoder, args.data, args.ridge, args.batch_size)
    print(format_table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"encoder": str(args.encoder), "data": str(args.data), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
