"""SFT data: records -> rendered prompt/target pairs, dataset mixing, length-grouped batches, collation.

Every prompt and target comes from `core.qwen_omni.render_prompt` / `render_target`, so training
sees exactly the text inference will produce. Each data file is rendered, tokenised and measured
once into the on-disk cache of `train/data_cache.py` (token lengths from the audio headers, without
decoding), which every rank memory-maps; samples longer than `data.max_length` are dropped and
counted, and the lengths drive the length-grouped batching.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from core import qwen_omni as qo
from core.audio import AudioError
from core.feature_cache import FeatureCache
from core.items import DataError, Item
from core.recipe import DataConfig
from train.data_cache import cached_records, render, sample_limit


@dataclass(frozen=True)
class Example:
    item: Item
    prompt: str
    target: str
    length: int  # prompt (with expanded audio) + target tokens
    source: str  # dataset path, for the mixing report
    audio_cropped: bool  # the clip is longer than data.max_audio_seconds and is cut to it


def render_examples(items: Sequence[Item], processor: qo.OmniProcessor, prompt_style: str, max_audio_seconds: float | None,
                    source: str) -> list[Example]:
    """A few items rendered and measured in memory, as the cache renders every record (tests, benchmarks)."""
    prompts, targets, samples, lengths = render(items, processor, prompt_style, max_audio_seconds)
    limit = sample_limit(max_audio_seconds)
    return [Example(item, prompt, target, length, source, n > limit)
            for item, prompt, target, n, length in zip(items, prompts, targets, samples, lengths)]


class Examples(Sequence[Example]):
    """The mixed training set: rows of the memory-mapped cache tables, in mixture order.

    Only arrays (row numbers, lengths, clip lengths) are held per example; an `Example` is made from
    its row when it is read, so 10^5-10^6 records cost each rank a few MB, not a copy of the data.
    """

    def __init__(self, tables: list, sources: list[str], rows: np.ndarray, max_audio_seconds: float | None, keep_alive: object = None):
        from datasets import concatenate_datasets

        self.table = concatenate_datasets(tables) if len(tables) > 1 else tables[0]
        self.sources = sources
        self.starts = np.cumsum([0] + [len(t) for t in tables[:-1]])  # first global row of each table
        self.rows = rows  # global row of each example
        self.lengths = self.table.data.column("length").to_numpy()[rows]  # prompt + target tokens
        self.audio_samples = self.table.data.column("audio_samples").to_numpy()[rows]  # whole clips, 16 kHz
        self.audio_cropped = self.audio_samples > sample_limit(max_audio_seconds)
        self._keep_alive = keep_alive  # a temporary cache folder lives as long as its examples

    def __len__(self) -> int:
        return len(self.rows)

    def source_index(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, rows, side="right") - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = int(self.rows[index])
        source = self.sources[int(self.source_index(np.array(row)))]
        record = self.table[row]
        item = Item(
            id=record["id"], audio_path=Path(record["audio_path"]), question=record["question"],
            choices=tuple(record["choices"]), answer=record["answer"], thinking=record["thinking"],
            where=f"{Path(source)}:{record['line']}",
        )
        target = qo.render_target(record["prompt"], record["thinking"], record["answer"])
        return Example(item, record["prompt"], target, int(self.lengths[index]), source, bool(self.audio_cropped[index]))


def mix(pools: list[np.ndarray], weights: list[float], seed: int) -> np.ndarray:
    """Mix datasets (arrays of rows) so that dataset i makes up weights[i] / sum(weights) of the result.

    The mixture keeps the total size of the pools; a dataset asked for more samples than it has
    is repeated (every sample as evenly as possible), one asked for fewer is subsampled at random.
    """
    if len(pools) == 1:
        return pools[0]
    rng = np.random.default_rng(seed)
    total = sum(len(p) for p in pools)
    mixed = []
    for pool, weight in zip(pools, weights):
        want = round(total * weight / sum(weights))
        repeats, rest = divmod(want, len(pool))
        mixed += [np.tile(pool, repeats), pool[rng.permutation(len(pool))[:rest]]]
    return np.concatenate(mixed)


def sample_rows(count: int, max_samples: int | None, seed: int) -> np.ndarray:
    """Rows of at most `max_samples` of `count` records (a seeded random subset, in file order); all when None."""
    if max_samples is None or max_samples >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).permutation(count)[:max_samples])


def build_examples(
    config: DataConfig, processor: qo.OmniProcessor, prompt_style: str, seed: int, log=print, cache_dir: str | Path | None = None,
) -> Examples:
    """Load (from the data cache, built first where missing), length-filter and mix every dataset of `data.train`.

    The cache lives in `data.cache`, else `cache_dir`, else a temporary folder that lives as long as the result.
    """
    if not config.train:
        raise DataError("recipe: data.train: no training datasets given")
    keep_alive = None
    root = config.cache or cache_dir
    if root is None:
        keep_alive = tempfile.TemporaryDirectory(prefix="sft-data-cache-")
        root = keep_alive.name
    tables, pools, weights, first_row = [], [], [], 0
    for index, spec in enumerate(config.train):
        # the cache reports its build on stderr: `log` gets the data lines only
        table = cached_records(spec.path, spec.audio_root, processor, prompt_style, config.max_audio_seconds,
                               root, config.cache_workers)
        rows = sample_rows(len(table), spec.max_samples, seed + index)
        kept = rows[table.data.column("length").to_numpy()[rows] <= config.max_length]
        cropped = int((table.data.column("audio_samples").to_numpy()[kept] > sample_limit(config.max_audio_seconds)).sum())
        cut = "whole clips" if config.max_audio_seconds is None else f"{config.max_audio_seconds:g} s"
        log(
            f"data: {spec.path}: {len(rows)} records, {len(rows) - len(kept)} dropped "
            f"(over data.max_length={config.max_length} tokens), {cropped} clips cropped to "
            f"data.max_audio_seconds={cut}, weight {spec.weight}"
        )
        if not len(kept):
            raise DataError(f"{spec.path}: every record is longer than data.max_length={config.max_length} tokens")
        tables.append(table)
        pools.append(kept + first_row)
        weights.append(spec.weight)
        first_row += len(table)
    examples = Examples(tables, [spec.path for spec in config.train], mix(pools, weights, seed), config.max_audio_seconds, keep_alive)
    shares: dict[str, int] = {}
    for pool, count in enumerate(np.bincount(examples.source_index(examples.rows), minlength=len(tables))):
        if count:
            shares[config.train[pool].path] = shares.get(config.train[pool].path, 0) + int(count)
    hours = examples.audio_samples.sum() / qo.SAMPLE_RATE / 3600
    log("data: mixture " + ", ".join(f"{src}: {n} ({100 * n / len(examples):.1f}%)" for src, n in shares.items())
        + f"; {hours:,.1f} h of whole clips")
    return examples


def epoch_batches(
    lengths: Sequence[int],
    batch_size: int,
    grad_accum: int,
    world_size: int,
    rank: int,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
) -> list[list[int]]:
    """This rank's micro-batches (lists of example indices) for one epoch.

    Every rank computes the same global order from (seed, epoch) and takes its own slice of each
    global batch, so ranks see disjoint samples without communicating. Only whole optimizer steps
    are kept (batch_size x world_size x grad_accum samples each): the remainder, different every
    epoch, waits for the next reshuffle. With `group_by_length`, each mega-batch of 32 global
    batches is sorted by length (longest first, so an out-of-memory shows at once) before it is
    cut, which cuts padding; the mega-batches themselves stay in random order.
    """
    global_batch = batch_size * world_size
    per_step = global_batch * grad_accum
    usable = len(lengths) // per_step * per_step
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths))[:usable]
    if group_by_length:
        mega = global_batch * 32
        lengths = np.asarray(lengths)
        # a stable sort on -length: ties keep their shuffled order
        order = np.concatenate([
            chunk[np.argsort(-lengths[chunk], kind="stable")] for chunk in np.split(order, range(mega, usable, mega))
        ]) if usable else order
    return [
        order[start + rank * batch_size : start + (rank + 1) * batch_size].tolist()
        for start in range(0, usable, global_batch)
    ]


class SFTDataset(torch.utils.data.Dataset):
    """One example's prompt, target and audio, read on access (in DataLoader workers when num_workers > 0).

    With a `feature_cache`, a row carries the clip's log-mel `features` instead of its waveform:
    the cache returns exactly what the collator would extract, so the batch is the same, and an
    epoch after the first skips decoding and extraction.
    """

    def __init__(self, examples: Sequence[Example], max_audio_seconds: float | None, feature_cache: FeatureCache | None = None):
        self.examples = examples
        self.max_audio_seconds = max_audio_seconds
        self.feature_cache = feature_cache

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        row = {"id": example.item.id, "prompt": example.prompt, "target": example.target}
        if self.feature_cache is None:
            row["audio"] = example.item.load_audio(self.max_audio_seconds)
        else:
            try:
                row["features"] = self.feature_cache.features_for(example.item.audio_path)
            except AudioError as err:
                raise DataError(f"{example.item.where} (id={example.item.id}): audio_path: {err}") from None
        return row


def feature_cache_for(config: DataConfig, processor: qo.OmniProcessor) -> FeatureCache | None:
    """The recipe's feature cache (`data.feature_cache`), or None: features from the waveforms."""
    if config.feature_cache is None:
        return None
    return FeatureCache(config.feature_cache, processor, config.max_audio_seconds)


@dataclass
class SFTCollator:
    """Right-padded model inputs with labels that are -100 outside the targets.

    Rows carry waveforms (`audio`) or precomputed per-clip `features`; both give the same batch.
    """

    processor: qo.OmniProcessor

    def __call__(self, rows: list[dict]) -> dict:
        cached = "features" in rows[0]
        batch = self.processor(
            [r["prompt"] for r in rows],
            audios=None if cached else [r["audio"] for r in rows],
            features=[r["features"] for r in rows] if cached else None,
            targets=[r["target"] for r in rows], padding_side="right",
        )
        batch["ids"] = [r["id"] for r in rows]
        return batch
