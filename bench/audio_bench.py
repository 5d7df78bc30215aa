"""Audio input pipeline: decode + resample, + feature extraction, and the feature cache (cold, warm).

    python -m bench.audio_bench                 # 12 generated clips of 10-30 s, 44.1 kHz stereo
    python -m bench.audio_bench --clips 64 --workers 0 2 4

Each pipeline runs through a torch DataLoader with 0 and with N workers, in the same run, so the
ratios hold on a loaded machine too. Clips are generated at 44.1 kHz stereo so that every clip
is downmixed and resampled to 16 kHz mono, as most real datasets are.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset

from bench.common import machine, print_table, write_json
from core.audio import load_audio, write_wav
from core.feature_cache import FeatureCache
from core.qwen_omni import OmniProcessor


def generate_clips(folder: Path, count: int, rate: int, seed: int = 0) -> list[Path]:
    """`count` stereo clips of 10-30 s: tones over noise, different in each channel."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        seconds = rng.uniform(10, 30)
        t = np.arange(int(seconds * rate)) / rate
        left = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t)
        right = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t)
        wave = np.stack([left, right], axis=1) + 0.05 * rng.standard_normal((t.size, 2))
        path = folder / f"clip{i:03d}.wav"
        write_wav(path, wave.astype(np.float32), rate)
        paths.append(path)
    return paths


class Pipeline(Dataset):
    """One clip per item, through one of the pipelines the benchmark compares."""

    def __init__(self, paths: list[Path], stage: str, processor: OmniProcessor, cache_dir: Path | None, max_seconds: float):
        self.paths, self.stage, self.processor, self.max_seconds = paths, stage, processor, max_seconds
        self.cache = FeatureCache(cache_dir, processor, max_seconds) if stage == "cache" else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> int:
        path = self.paths[index]
        if self.stage == "decode":
            return load_audio(path, self.max_seconds).size
        if self.stage == "decode+extract":
            return self.processor.clip_features(load_audio(path, self.max_seconds)).shape[-1]
        return self.cache.features_for(path).shape[-1]  # workers share the folder, each its own copy


def run(dataset: Pipeline, workers: int) -> float:
    """Seconds to read every item once."""
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, shuffle=False)
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--rate", type=int, default=44_100, help="sample rate of the generated clips")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--checkpoint", default=None,
                        help="feature extractor config folder (default: Whisper, 128 mel bins, as Qwen3-Omni)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    if args.checkpoint:
        processor = OmniProcessor.from_pretrained(args.checkpoint)
    else:
        from transformers import WhisperFeatureExtractor

        processor = OmniProcessor(tokenizer=None, feature_extractor=WhisperFeatureExtractor(feature_size=128, sampling_rate=16_000))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = generate_clips(tmp / "clips", args.clips, args.rate)
        load_audio(paths[0])  # the first resample compiles librosa's kernels (numba): keep that out of the timings
        audio_seconds = sum(min(_duration(p), args.max_seconds) for p in paths)
        rows = []
        for workers in args.workers:
            cache_dir = tmp / f"cache-{workers}"
            for stage, label in [("decode", "decode + resample"), ("decode+extract", "decode + features (no cache)"),
                                 ("cache", "feature cache, cold (fills it)"), ("cache", "feature cache, warm")]:
                seconds = run(Pipeline(paths, stage, processor, cache_dir, args.max_seconds), workers)
                rows.append({"pipeline": label, "workers": workers, "clips/s": args.clips / seconds,
                             "audio s/s": audio_seconds / seconds})
        for row in rows:
            base = next(r for r in rows if r["workers"] == row["workers"] and r["pipeline"].startswith("decode + features"))
            row["vs no cache"] = row["clips/s"] / base["clips/s"]
    info = machine()
    print_table(rows, f"Audio pipeline, {args.clips} clips of 10-30 s ({audio_seconds:.0f} s), "
                      f"{args.rate} Hz stereo -> 16 kHz mono, 128 mel bins")
    for workers in args.workers:
        warm = next(r for r in rows if r["workers"] == workers and r["pipeline"].endswith("warm"))
        print(f"workers={workers}: cached (warm) / uncached features: {warm['vs no cache']:.1f}x")
    print("machine:", info)
    write_json(args.json, {"rows": rows, "clips": args.clips, "rate": args.rate, "machine": info})


def _duration(path: Path) -> float:
    import soundfile as sf

    return sf.info(str(path)).duration


if __name__ == "__main__":
    main()
