"""Audio decoding: any file soundfile reads, to 16 kHz mono float32.

`datasets.Audio` decodes through torchcodec, which needs CUDA libraries; soundfile + librosa's
resampler work everywhere.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf

from core.qwen_omni import SAMPLE_RATE


class AudioError(ValueError):
    """An audio file that is missing or cannot be decoded; the message names the file."""


def load_audio(path: str | Path, max_seconds: float | None = None) -> np.ndarray:
    """Decode `path` to a mono float32 waveform at 16 kHz, optionally cut to `max_seconds`."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found")
    return decode_audio(str(path), path, max_seconds)


def audio_samples(path: str | Path, max_seconds: float | None = None) -> int:
    """Samples `load_audio(path, max_seconds)` will return, from the file header only: a fast check
    that a clip is there and readable before hours of work depend on it."""
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError(f"{path}: cannot read audio header ({err})") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError(f"{path}: audio file holds no samples")
    samples = math.ceil(info.frames * SAMPLE_RATE / info.samplerate)  # librosa's resampled length
    return samples if max_seconds is None else min(samples, int(max_seconds * SAMPLE_RATE))


def decode_audio(source: str | BinaryIO, path: str | Path, max_seconds: float | None = None) -> np.ndarray:
    """Like `load_audio`, from a file name or an open binary file (e.g. bytes already read and
    hashed); `path` names the clip in errors."""
    try:
        wave, rate = sf.read(source, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError(f"{path}: cannot decode audio ({err})") from None
    if not np.isfinite(wave).all():  # NaN/inf samples poison every loss and output they reach
        bad = int((~np.isfinite(wave)).any(axis=1).sum())
        raise AudioError(f"{path}: audio holds non-finite samples (NaN or infinity) in {bad} of {len(wave)} frames")
    wave = wave.mean(axis=1)
    if rate != SAMPLE_RATE:
        import librosa  # imported lazily: its first call compiles with numba for ~15 s

        wave = librosa.resample(wave, orig_sr=rate, target_sr=SAMPLE_RATE)
    if wave.size == 0:
        raise AudioError(f"{path}: audio file holds no samples")
    if max_seconds is not None:
        wave = wave[: int(max_seconds * SAMPLE_RATE)]
    return np.ascontiguousarray(wave, dtype=np.float32)


def write_wav(path: str | Path, wave: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wave, rate, subtype="PCM_16")
