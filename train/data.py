"""SFT data: records -> rendered prompt/target pairs, dataset mixing, length-grouped batches, collation.

Every prompt and target comes from `core.qwen_omni.render_prompt` / `render_target`, so training
sees exactly the text inference will produce. Token lengths are computed once, up front, from the
audio headers (no decoding) and the tokenizer; samples longer than `data.max_length` are dropped
and counted, and the lengths drive the length-grouped batching.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from core import qwen_omni as qo
from core.audio import AudioError
from core.feature_cache import FeatureCache
from core.items import DataError, Item, load_items
from core.recipe import DataConfig


@dataclass(frozen=True)
class Example:
    item: Item
    prompt: str
    target: str
    length: int  # prompt (with expanded audio) + target tokens
    source: str  # dataset path, for the mixing report
    audio_cropped: bool  # the clip is longer than data.max_audio_seconds and is cut to it


def render_examples(items: Sequence[Item], processor: qo.OmniProcessor, prompt_style: str, max_audio_seconds: float, source: str) -> list[Example]:
    tokenizer = processor.tokenizer
    prompts, targets = [], []
    for item in items:
        prompt = qo.render_prompt(tokenizer, item.question, item.choices, prompt_style)
        prompts.append(prompt)
        targets.append(qo.render_target(prompt, item.thinking, item.answer))
    limit = int(max_audio_seconds * qo.SAMPLE_RATE)
    samples = [item.audio_samples() for item in items]  # whole clips, from the headers
    expanded = [
        processor.expand_audio(prompt, qo.feature_frames(min(n, limit))) for prompt, n in zip(prompts, samples)
    ]
    # One batched call each: the fast tokenizer parallelises lists, which matters at 10^5 records.
    prompt_ids = tokenizer(expanded, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    return [
        Example(item, prompt, target, len(p) + len(t), source, n > limit)
        for item, prompt, target, p, t, n in zip(items, prompts, targets, prompt_ids, target_ids, samples)
    ]


def mix(pools: list[list[Example]], weights: list[float], seed: int) -> list[Example]:
    """Mix datasets so that dataset i makes up weights[i] / sum(weights) of the result.

    The mixture keeps the total size of the pools; a dataset asked for more samples than it has
    is repeated (every sample as evenly as possible), one asked for fewer is subsampled at random.
    """
    if len(pools) == 1:
        return list(pools[0])
    rng = np.random.default_rng(seed)
    total = sum(len(p) for p in pools)
    mixed: list[Example] = []
    for pool, weight in zip(pools, weights):
        want = round(total * weight / sum(weights))
        repeats, rest = divmod(want, len(pool))
        mixed += list(pool) * repeats + [pool[i] for i in rng.permutation(len(pool))[:rest]]
    return mixed


def cap_samples(items: list, max_samples: int | None, seed: int) -> list:
    """At most `max_samples` of `items` (a seeded random subset, in file order); all of them when None."""
    if max_samples is None or max_samples >= len(items):
        return items
    keep = np.random.default_rng(seed).permutation(len(items))[:max_samples]
    return [items[i] for i in sorted(keep)]


def build_examples(config: DataConfig, processor: qo.OmniProcessor, prompt_style: str, seed: int, log=print) -> list[Example]:
    """Load, render, length-filter and mix every dataset of `data.train`."""
    if not config.train:
        raise DataError("recipe: data.train: no training datasets given")
    pools, weights = [], []
    for index, spec in enumerate(config.train):
        items = cap_samples(load_items(spec.path, spec.audio_root, check_audio=True, require_thinking=True),
                            spec.max_samples, seed + index)
        examples = render_examples(items, processor, prompt_style, config.max_audio_seconds, spec.path)
        kept = [e for e in examples if e.length <= config.max_length]
        cropped = sum(e.audio_cropped for e in kept)
        log(
            f"data: {spec.path}: {len(examples)} records, {len(examples) - len(kept)} dropped "
            f"(over data.max_length={config.max_length} tokens), {cropped} clips cropped to "
            f"data.max_audio_seconds={config.max_audio_seconds:g} s (training only), weight {spec.weight}"
        )
        if not kept:
            raise DataError(f"{spec.path}: every record is longer than data.max_length={config.max_length} tokens")
        pools.append(kept)
        weights.append(spec.weight)
    mixed = mix(pools, weights, seed)
    shares = Counter(e.source for e in mixed)
    log("data: mixture " + ", ".join(f"{src}: {n} ({100 * n / len(mixed):.1f}%)" for src, n in shares.items()))
    return mixed


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
        order = np.concatenate([
            sorted(order[i : i + mega], key=lambda j: -lengths[j]) for i in range(0, usable, mega)
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

    def __init__(self, examples: Sequence[Example], max_audio_seconds: float, feature_cache: FeatureCache | None = None):
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
