"""A disk cache of per-clip Whisper log-mel features, for clips that are read every epoch.

    python -m core.feature_cache build META.jsonl --checkpoint CKPT --out DIR [--max-seconds S]

    cache = FeatureCache(DIR, processor, max_seconds=30)
    batch = processor(prompts, features=[cache.features_for(item.audio_path) for item in items])

`features_for(path)` returns exactly `processor.clip_features(load_audio(path, max_seconds))`, so a
batch built from cached features equals one built from waveforms (OmniProcessor pads both alike).

Keys. An entry is keyed by the hash of the audio file's bytes, not by path + size + mtime: a file
rewritten within the mtime granularity, or replaced by a copy that keeps size and mtime (cp -p,
rsync -t), must not hit a stale entry, and the same clip under two paths is stored once. Hashing
(blake2b, ~1 GB/s) costs a few ms per clip against the ~100 ms of decoding, resampling and
extracting it. The bytes that are hashed are the bytes that are decoded, so a file that changes
during a read cannot be stored under the other version's key. Entries live under a folder named
after the hash of everything else the features depend on: the feature extractor's config,
`max_seconds`, the sample rate and FORMAT_VERSION (bump it when decoding or extraction code
changes results).

Layout: DIR/<config hash>/<2 hex>/<content hash>.npy, one float32 `[mel_bins, frames]` array per
clip, plus DIR/<config hash>/extractor.json describing what the folder holds. One file per clip
rather than packed shards: each write is a private temporary file renamed into place
(`os.replace`, atomic on POSIX), so any number of dataloader workers and ranks can fill the same
cache without locks; a reader sees a whole entry or none, and an unreadable entry (a crash on a
filesystem without ordered writes) is recomputed and replaced.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from core.audio import AudioError, decode_audio
from core.progress import progress
from core.qwen_omni import SAMPLE_RATE, OmniProcessor

FORMAT_VERSION = 2  # 2: clips hop-aligned before extraction (qwen_omni.align_to_hop)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class FeatureCache:
    """Per-clip features of `processor.clip_features`, computed once and stored under `root`."""

    def __init__(self, root: str | Path, processor: OmniProcessor, max_seconds: float | None = None):
        self.processor = processor
        self.max_seconds = max_seconds
        description = {
            "feature_extractor": processor.feature_extractor.to_dict(),
            "max_seconds": max_seconds,
            "sample_rate": SAMPLE_RATE,
            "format_version": FORMAT_VERSION,
        }
        text = json.dumps(description, sort_keys=True, default=str)
        self.dir = Path(root) / _digest(text.encode())
        self.mel_bins = processor.feature_extractor.feature_size
        self.hits = self.misses = 0
        if not (self.dir / "extractor.json").is_file():
            _atomic_write(self.dir / "extractor.json", lambda f: f.write(text.encode()))

    def entry(self, content_hash: str) -> Path:
        return self.dir / content_hash[:2] / f"{content_hash}.npy"

    def features_for(self, path: str | Path) -> np.ndarray:
        """Features of the clip at `path`: `[mel_bins, frames]` float32, from the cache when present."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise AudioError(f"{path}: audio file not found") from None
        entry = self.entry(_digest(data))
        cached = self._read(entry)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        features = self.processor.clip_features(decode_audio(io.BytesIO(data), path, self.max_seconds))
        _atomic_write(entry, lambda f: np.save(f, features, allow_pickle=False))
        return features

    def _read(self, entry: Path) -> np.ndarray | None:
        try:
            features = np.load(entry, allow_pickle=False)
        except (OSError, ValueError, EOFError):  # missing, torn or foreign: (re)compute it
            return None
        if features.dtype != np.float32 or features.ndim != 2 or features.shape[0] != self.mel_bins:
            return None
        return features


def _atomic_write(target: Path, write) -> None:
    """Write through a private temporary file, then rename it over `target` (atomic on POSIX)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- precompute CLI -------------------------------------------------------------------------

_worker_cache: FeatureCache | None = None


def _init_worker(out: str, checkpoint: str, max_seconds: float | None) -> None:
    global _worker_cache
    _worker_cache = FeatureCache(out, OmniProcessor.from_pretrained(checkpoint), max_seconds)


def _fill(path: str) -> tuple[bool, int]:
    """Make sure `path` is cached; returns (it was already, its frames)."""
    hits = _worker_cache.hits
    frames = _worker_cache.features_for(path).shape[-1]
    return _worker_cache.hits > hits, frames


def build(meta: str, checkpoint: str, out: str, audio_root: str | None, max_seconds: float | None, workers: int) -> dict:
    """Cache the features of every clip `meta` names; returns a summary (clips, hits, throughput)."""
    from core.items import load_items

    paths = sorted({str(item.audio_path) for item in load_items(meta, audio_root, check_audio=True)})
    _init_worker(out, checkpoint, max_seconds)
    cache_dir = _worker_cache.dir
    start = time.perf_counter()
    hits = frames = 0
    pool = _Serial() if workers <= 1 else ProcessPoolExecutor(
        workers, initializer=_init_worker, initargs=(out, checkpoint, max_seconds)
    )
    with pool, progress(len(paths), "features", unit="clip") as bar:
        for hit, n in pool.map(_fill, paths, chunksize=8):
            hits += hit
            frames += n
            bar.update()
    seconds = time.perf_counter() - start
    return {
        "clips": len(paths), "already_cached": hits, "computed": len(paths) - hits,
        "audio_hours": round(frames / 100 / 3600, 3), "seconds": round(seconds, 2),
        "clips_per_s": round(len(paths) / max(seconds, 1e-9), 1), "cache_dir": str(cache_dir),
    }


class _Serial:
    """The executor interface, in this process (no pool start-up for one worker)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items, chunksize=1):
        return map(fn, items)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="precompute the features of every clip of a JSONL (resumes: cached clips are skipped)")
    b.add_argument("meta", help="MMAR-schema or SFT JSONL")
    b.add_argument("--checkpoint", required=True, help="folder with the feature extractor config (preprocessor_config.json)")
    b.add_argument("--out", required=True, help="cache folder")
    b.add_argument("--audio-root", default=None, help="folder audio_path is relative to (default: the JSONL's folder)")
    b.add_argument("--max-seconds", type=float, default=None,
                   help="must match data.max_audio_seconds of the run (default: none, whole clips, its default)")
    b.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    summary = build(args.meta, args.checkpoint, args.out, args.audio_root, args.max_seconds, args.workers)
    json.dump(summary, sys.stdout)
    print()


if __name__ == "__main__":
    main()
