"""GRPO's rollouts: which prompts each step takes (the curriculum's stages, their datasets mixed by
weight, a pure function of seed and step), G sampled completions of each with its audio through the
inference engine on the policy being trained (`grpo.rollout_engine`: hf generate on the policy itself,
or a vLLM engine in the trainer's process that the policy's merged weights are pushed into), and the
batch that scores exactly the sampled tokens.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from core import qwen_omni as qo
from core.items import DataError, Item, load_items
from core.recipe import GRPOStage, Recipe
from infer.engine import Engine, HFEngine, Request, SamplingConfig, VLLMEngine
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
    rollout_logps: list[float] | None = None  # the sampling engine's log-prob of each completion id (vLLM only)


def roll_out(engine: Engine, processor: qo.OmniProcessor, items: Sequence[Item], recipe: Recipe,
             sampling: SamplingConfig) -> tuple[list[Sample], int, float]:
    """G completions of every item (consecutive per item); returns (samples, generated tokens, seconds)."""
    group = recipe.grpo.num_generations
    prompts = [qo.render_prompt(processor.tokenizer, it.question, it.choices, recipe.model.prompt_style) for it in items]
    audios = [it.load_audio(recipe.data.max_audio_seconds) for it in items]
    requests = [Request(it.id, prompt, audio) for it, prompt, audio in zip(items, prompts, audios)]
    start = time.perf_counter()
    # The hf engine seeds torch once per call itself; the vLLM engine runs in this process and samples from
    # the same global generator (no per-request seeds: see infer.engine.vllm_sampling_kwargs), so one seed
    # per step makes its rollouts repeat too.
    torch.manual_seed(sampling.seed)
    generations = engine.generate_groups(requests, group, sampling)
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
                              ids + [end_of_turn] * generation.finished,
                              list(generation.logprobs) if generation.logprobs is not None else None))
    return samples, sum(g.n_generated_tokens for g in generations), seconds


def tensor_parallel_share(items: Sequence[Item], tp: int, rank: int) -> tuple[list[Item], slice]:
    """With a rollout engine spanning `tp` ranks (consecutive ranks, as vLLM forms its tensor-parallel groups
    under `external_launcher`), every rank of the group must hand it the same requests: the prompts of all of
    the group's ranks. Returns them and the slice of them that is this rank's own."""
    if tp == 1:
        return list(items), slice(0, len(items))
    import torch.distributed as dist

    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, list(items))
    first = rank - rank % tp
    start = sum(len(everyone[r]) for r in range(first, rank))
    return [it for r in range(first, first + tp) for it in everyone[r]], slice(start, start + len(items))


def placeholder_ids(processor: qo.OmniProcessor) -> list[int]:
    """Multimodal placeholder tokens, never sampled: fed back for scoring, a completion's <|audio_pad|> would be
    taken for an audio position and the forward would fail (a weak policy does emit them)."""
    return [processor.token_id(t) for t in (qo.AUDIO_PAD, qo.IMAGE_PAD, qo.VIDEO_PAD)]


def rollout_sampling(recipe: Recipe) -> SamplingConfig:
    """How rollouts sample, as `grpo` says. No thinking budget is forced: its closing tokens would not be the
    policy's samples; the length reward teaches the budget instead."""
    grpo = recipe.grpo
    return SamplingConfig(max_new_tokens=grpo.max_new_tokens, do_sample=True, temperature=grpo.temperature,
                          top_p=grpo.top_p, top_k=grpo.top_k)


def rollout_engine(policy, processor: qo.OmniProcessor, recipe: Recipe, device: str) -> HFEngine:
    """The hf engine on the policy being trained (its adapter active, unmerged)."""
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    base.generation_config.suppress_tokens = placeholder_ids(processor)
    return HFEngine(policy, processor, rollout_sampling(recipe), recipe.grpo.rollout_batch_size, device)


def vllm_rollout_kwargs(recipe: Recipe, group: int, distributed: bool) -> dict[str, Any]:
    """`vllm.LLM(**kwargs)` of a rank's rollout engine: the base checkpoint (the policy's weights are pushed in
    before the first rollout), `grpo.vllm`'s memory settings, log-probs of the processed (temperature-scaled)
    distribution, as the trainer scores them. Under several ranks vLLM joins the trainer's process group
    (`external_launcher`) instead of starting its own; each engine (`group`: its tensor-parallel group's
    index) samples with its own seed."""
    v = recipe.grpo.vllm
    kwargs = dict(model=recipe.model.path, dtype=recipe.model.dtype, seed=recipe.train.seed + group,
                  tensor_parallel_size=v.tensor_parallel_size, gpu_memory_utilization=v.gpu_memory_utilization,
                  limit_mm_per_prompt=dict(recipe.infer.limit_mm_per_prompt), logprobs_mode="processed_logprobs",
                  enforce_eager=v.enforce_eager, trust_remote_code=False)
    if v.max_model_len is not None:
        kwargs["max_model_len"] = v.max_model_len
    if v.kv_cache_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(v.kv_cache_gib * 2**30)
    if distributed:
        kwargs["distributed_executor_backend"] = "external_launcher"
    return kwargs


def vllm_rollout_engine(recipe: Recipe, processor: qo.OmniProcessor, group: int, distributed: bool) -> VLLMEngine:
    """A vLLM engine in this process (colocated with the trainer; docs/grpo.md says why), sampling as `grpo` says."""
    # In-process engine core: the weight push hands tensors to the worker without serialising them, and
    # no engine process re-imports the trainer's main module.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return VLLMEngine(recipe, rollout_sampling(recipe), vllm_rollout_kwargs(recipe, group, distributed),
                      logit_bias={i: -100.0 for i in placeholder_ids(processor)})


def merged_lora_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """The base tensors the policy's LoRA touches, with the adapter merged in (base + delta, not written back),
    in transformers' names; module by module, and under ZeRO-3 each module's shards gathered only while it is
    read. The other tensors equal the checkpoint's and are never pushed."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        leaf = getattr(module, "parameter_name", None) or "weight"  # ParamWrapper (fused experts) or a Linear
        with gathered(list(module.parameters())):
            base = getattr(module.get_base_layer(), leaf)
            merged = base.detach().clone()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    merged += module.get_delta_weight(adapter).to(merged.dtype)
        yield name.removeprefix("base_model.model.").replace(".base_layer", "") + f".{leaf}", merged


def gathered(params: list[torch.Tensor]):
    """Under ZeRO-3, the full tensors of `params` inside the block; otherwise nothing to do."""
    import contextlib

    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def push_policy(engine: VLLMEngine, model, dtype: torch.dtype) -> tuple[int, float]:
    """The policy's merged LoRA-touched tensors into the engine (checkpoint names, the engine's dtype);
    returns (tensors pushed, seconds)."""
    weights = [(name, tensor.to(dtype)) for hf_name, merged in merged_lora_weights(model)
               for name, tensor in qo.checkpoint_tensors(hf_name, merged)]
    return len(weights), engine.load_weights(weights)


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
