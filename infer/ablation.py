"""Audio reliance: the clip a request hears under `infer.audio_ablation`, the one place it is decided.

- `none`: the item's own clip;
- `silence`: zeros of the length the item's own clip has (after `infer.max_audio_seconds`), so prompt
  length and audio placeholders are those of the normal run and only the signal is gone;
- `swap`: the clip of another item of the same metadata file, by a derangement (no item keeps its own
  clip) fixed by the seed over every item of the file: an `infer.limit` or a data-parallel share hears
  the same clips as the whole run.

A model that answers as well without its audio answers from the text alone (`python -m eval reliance`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from core.items import Item

ABLATIONS = ("none", "silence", "swap")


def derangement(n: int, seed: int) -> list[int]:
    """A permutation of range(n) without fixed points, the same for the same (n, seed): a seeded shuffle
    cut into one cycle (Sattolo's algorithm), so every index moves. n < 2 has none: an error."""
    if n < 2:
        raise ValueError(f"swapping clips needs at least 2 items, got {n}")
    order = list(range(n))
    rng = np.random.default_rng(seed)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))  # j < i: Sattolo, one n-cycle
        order[i], order[j] = order[j], order[i]
    return order


def donors(items: Sequence[Item], mode: str, seed: int) -> dict[str, Item]:
    """id -> the item whose clip it hears (`swap` only; empty otherwise)."""
    if mode not in ABLATIONS:
        raise ValueError(f"infer.audio_ablation: {mode!r} is not one of {ABLATIONS}")
    if mode != "swap":
        return {}
    order = derangement(len(items), seed)
    return {item.id: items[order[k]] for k, item in enumerate(items)}


def request_audio(item: Item, mode: str, donor: Item | None, max_seconds: float | None) -> np.ndarray:
    """The waveform `item`'s request carries under `mode` (16 kHz mono float32)."""
    if mode == "none":
        return item.load_audio(max_seconds)
    if mode == "silence":  # the header gives the length: the clip is never decoded
        return np.zeros(item.audio_samples(max_seconds), dtype=np.float32)
    if mode == "swap":
        if donor is None:
            raise ValueError(f"{item.where} (id={item.id}): no clip to swap in")
        return donor.load_audio(max_seconds)
    raise ValueError(f"infer.audio_ablation: {mode!r} is not one of {ABLATIONS}")
