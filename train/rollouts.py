"""GRPO's rollouts: which prompts each step takes (the curriculum's stages, their datasets mixed by
weight, a pure function of seed and step), G sampled completions of each with its audio through the
inference engine on the policy being trained, and the batch that scores exactly the sampled tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from core import qwen_omni as qo
from core.items import DataError, Item, load_items
from core.recipe import GRPOStage, Recipe
from infer.engine import HFEngine, Request, SamplingConfig
from infer.parse import parse_output
from train.data import epoch_batches, mix, sample_rows
from train.rewards import Rollout


def stage_items(stage: GRPOStage, seed: int, needs_reference: bool) -> list[Item]:
    """The stage's records, its datasets mixed by weight (train.data.mix, on row numbers)."""
    items, pools, weights = [], [], []
    for index, spec in enumerate(stage.data):
        loaded = load_items(spec.path, spec.audio_root, check_audio=True, require_thinking=needs_reference)
        pools.append(len(items) + sample_rows(len(loaded), spec.max_samples, seed + index))
        items += loaded
        weights.append(spec.weight)
    return [items[i] for i in mix(pools, weights, seed)]


@dataclass
class Schedule:
    """Which stage and which prompts each rollout step uses; a pure function of (seed, step)."""

    stages: list[GRPOStage]
    items: list[list[Item]]  # per stage
    prompts_per_rank: int
    world: int
    rank: int
    seed: int

    def __post_init__(self):
        for stage, items in zip(self.stages, self.items):
            if len(items) < self.prompts_per_rank * self.world:
                raise DataError(f"grpo stage {stage.name}: {len(items)} records make no step of "
                                f"{self.prompts_per_rank * self.world} prompts (ranks x prompts per rank)")

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def stage_at(self, step: int) -> tuple[int, int]:
        """(stage index, step within the stage) of global rollout step `step` (0-based)."""
        for index, stage in enumerate(self.stages):
            if step < stage.steps:
                return index, step
            step -= stage.steps
        raise IndexError("step past the last stage")

    def prompts(self, step: int) -> tuple[int, list[Item]]:
        index, local = self.stage_at(step)
        items = self.items[index]
        per_epoch = len(items) // (self.prompts_per_rank * self.world)
        epoch, window = divmod(local, per_epoch)
        batches = epoch_batches([0] * len(items), self.prompts_per_rank, 1, self.world, self.rank,
                                self.seed + index, epoch, group_by_length=False)
        return index, [items[i] for i in batches[window]]


@dataclass
class Sample:
    rollout: Rollout
    prompt: str
    features: np.ndarray  # the clip's log-mel, shared by its group
    completion_ids: list[int]  # generated ids, plus the end-of-turn token when the model ended


def roll_out(engine: HFEngine, items: Sequence[Item], recipe: Recipe, sampling: SamplingConfig) -> tuple[list[Sample], int, float]:
    """G completions of every item (consecutive per item); returns (samples, generated tokens, seconds)."""
    processor, group = engine.processor, recipe.grpo.num_generations
    prompts = [qo.render_prompt(processor.tokenizer, it.question, it.choices, recipe.model.prompt_style) for it in items]
    audios = [it.load_audio(recipe.data.max_audio_seconds) for it in items]
    requests = [Request(f"{it.id}#{g}", prompt, audio)
                for it, prompt, audio in zip(items, prompts, audios) for g in range(group)]
    start = time.perf_counter()
    generations = engine.generate(requests, sampling)
    seconds = time.perf_counter() - start
    features = [processor.clip_features(audio) for audio in audios]
    think_close = processor.token_id(qo.THINK_CLOSE)
    end_of_turn = processor.token_id(qo.IM_END)
    samples = []
    for k, generation in enumerate(generations):
        item_index = k // group
        item, ids = items[item_index], list(generation.token_ids)
        thinking_tokens = len(ids) - ids[::-1].index(think_close) - 1 if think_close in ids else len(ids)
        rollout = Rollout(generation.id, item, generation.text, parse_output(generation.text, item.choices),
                          thinking_tokens, generation.finished)
        samples.append(Sample(rollout, prompts[item_index], features[item_index],
                              ids + [end_of_turn] * generation.finished))
    return samples, sum(g.n_generated_tokens for g in generations), seconds


def rollout_engine(policy, processor: qo.OmniProcessor, recipe: Recipe, device: str) -> HFEngine:
    """The inference engine on the policy being trained (its adapter active, unmerged), sampling as `grpo` says.

    Multimodal placeholder tokens are never sampled: fed back for scoring, a completion's <|audio_pad|>
    would be taken for an audio position and the forward would fail (a weak policy does emit them).
    No thinking budget is forced: its closing tokens would not be the policy's samples; the length
    reward teaches the budget instead.
    """
    grpo = recipe.grpo
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    base.generation_config.suppress_tokens = [processor.token_id(t) for t in (qo.AUDIO_PAD, qo.IMAGE_PAD, qo.VIDEO_PAD)]
    sampling = SamplingConfig(max_new_tokens=grpo.max_new_tokens, do_sample=True, temperature=grpo.temperature,
                              top_p=grpo.top_p, top_k=grpo.top_k)
    return HFEngine(policy, processor, sampling, grpo.rollout_batch_size, device)


def sequence_batch(processor: qo.OmniProcessor, samples: Sequence[Sample]) -> dict:
    """Right-padded prompt + completion ids with the clips' features; labels only on the completions.

    The completion ids are the generated ones, not a re-tokenisation of the decoded text (which may split
    differently), so the scored tokens are exactly the sampled ones.
    """
    batch = processor.audio_features(features=[s.features for s in samples])
    frames = batch["feature_attention_mask"].sum(-1).tolist()
    sequences, labels = [], []
    for sample, n in zip(samples, frames):
        prompt_ids = processor.tokenizer(processor.expand_audio(sample.prompt, n), add_special_tokens=False)["input_ids"]
        sequences.append(prompt_ids + sample.completion_ids)
        labels.append([qo.IGNORE_INDEX] * len(prompt_ids) + sample.completion_ids)
    batch.update(qo.pad_sequences(sequences, labels, processor.tokenizer.pad_token_id, "right"))
    return batch
