"""Audio decoding: any file soundfile reads, to 16 kHz mono float32.

`datasets.Audio` decodes through torchcodec, which needs CUDA libraries; soundfile + librosa's
resampler work everywhere.

Every clip's header is checked before anything is decoded: a damaged or hostile header (a wav that
claims 1 Hz would resample 40 KB into gigabytes) is an `AudioError` naming the file, which a run
records as that item's failure, never a MemoryError that ends it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf

from core.qwen_omni import SAMPLE_RATE

# What a header may claim. The lowest rate in real use is 8 kHz telephony (some 4-6 kHz archives), the
# highest 384-768 kHz studio masters; an hour at 16 kHz is 230 MB of float32, far past any benchmark clip.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 768_000
MAX_AUDIO_SECONDS = 3600.0
MAX_CHANNELS = 64


class AudioError(ValueError):
    """An audio file that is missing or cannot be decoded; the message names the file."""


def check_header(path: str | Path, rate: int, frames: int, channels: int) -> None:
    """`AudioError` naming `path` unless its header's rate, length and channels are ones a clip can have."""
    if frames <= 0 or rate <= 0:
        raise AudioError(f"{path}: audio file holds no samples")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"{path}: header claims a sample rate of {rate:,} Hz, outside {MIN_SAMPLE_RATE:,}-"
                         f"{MAX_SAMPLE_RATE:,} Hz: a damaged or mislabelled file")
    if frames / rate > MAX_AUDIO_SECONDS:
        raise AudioError(f"{path}: header claims {frames / rate:,.0f} s of audio ({frames:,} frames at {rate:,} Hz), "
                         f"more than the {MAX_AUDIO_SECONDS:,.0f} s a clip may hold")
    if channels > MAX_CHANNELS:
        raise AudioError(f"{path}: header claims {channels:,} channels, more than {MAX_CHANNELS}")


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
    check_header(path, info.samplerate, info.frames, info.channels)
    samples = math.ceil(info.frames * SAMPLE_RATE / info.samplerate)  # librosa's resampled length
    return samples if max_seconds is None else min(samples, int(max_seconds * SAMPLE_RATE))


def decode_audio(source: str | BinaryIO, path: str | Path, max_seconds: float | None = None) -> np.ndarray:
    """Like `load_audio`, from a file name or an open binary file (e.g. bytes already read and
    hashed); `path` names the clip in errors."""
    try:
        with sf.SoundFile(source) as handle:
            check_header(path, handle.samplerate, handle.frames, handle.channels)
            wave, rate = handle.read(dtype="float32", always_2d=True), handle.samplerate
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
