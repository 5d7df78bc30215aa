"""GRPO on audio after SFT, from a recipe's `grpo` section.

    python train/grpo.py recipes/grpo_tiny.yaml [grpo.beta=0.04 ...]
    accelerate launch --config_file recipes/accelerate/zero2_8gpu.yaml train/grpo.py recipes/grpo_qwen3_omni.yaml

Each rollout step, on every rank: take this rank's prompts of the current curriculum stage, sample
`grpo.num_generations` (G) completions of each with its audio through the inference engine (hf
`generate` on the policy being trained), score them with the stage's weighted rewards
(train/rewards.py), normalise the rewards within each prompt's group into advantages, then take
`grpo.iterations` optimizer steps on the clipped-ratio objective, plus `grpo.beta` x KL to the
reference policy: the policy it started from, i.e. the SFT adapter of `grpo.init_adapter` (its weights
swapped in for the reference forward), or the base model for a fresh adapter (no second copy of the model).

Per rank and step the rollouts are `train.batch_size x train.grad_accum` sequences (a multiple of
G): `train.grad_accum` micro-batches of `train.batch_size`. As in SFT, the loss is the mean over
every completion token of the global batch (token-level, all ranks), and the launch forms, the
optimizer step, checkpoints (adapter + optimizer, scheduler, RNG), resume and provenance are the
trainers' shared runtime (train/runtime.py). `train.loss_chunk_tokens` scores the completions a chunk
of tokens at a time, as SFT's loss (train/loss.py).

Writes to `train.output_dir`: recipe.yaml, provenance.jsonl, metrics.jsonl (per step: loss, lr,
grad norm, mean/std of each reward and of the weighted total, rollout accuracy, KL, clip fraction,
completion length, rollout tokens/s), rollouts/rank{R}.jsonl (every completion with its rewards),
checkpoints/step-N/ and adapter/.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

# `python train/grpo.py` / `accelerate launch train/grpo.py` put train/ first on sys.path, not the repo.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import qwen_omni as qo  # noqa: E402
from core.items import DataError, Item, load_items  # noqa: E402
from core.progress import progress  # noqa: E402
from core.recipe import GRPOStage, Recipe, RecipeError, recipe_cli  # noqa: E402
from infer.engine import HFEngine, Request, SamplingConfig  # noqa: E402
from infer.parse import parse_output  # noqa: E402
from train import runtime  # noqa: E402
from train.data import epoch_batches, mix, sample_rows  # noqa: E402
from train.loss import make_token_logps  # noqa: E402
from train.rewards import Rollout, build_rewards  # noqa: E402

# ---------------------------------------------------------------- the objective (pure functions)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Reward minus its group's mean (and divided by the group's std when `scale == "group"`).

    `rewards` holds consecutive groups of `group_size` completions of the same prompt. A group whose
    completions all score the same gets advantage 0: it carries no signal about which is better.
    """
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale != "none":
        raise ValueError(f"unknown reward scaling {scale!r}")
    return centred.reshape(-1)


@dataclass
class LossParts:
    loss: torch.Tensor  # this micro-batch's share of the global per-token mean
    kl_sum: float  # sums over this micro-batch's completion tokens (divided by the global count in the log)
    clipped: int
    tokens: int


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              total_tokens: int | torch.Tensor, clip_low: float, clip_high: float,
              ref_logps: torch.Tensor | None = None, beta: float = 0.0) -> LossParts:
    """Clipped-ratio policy loss (+ beta x KL) summed over masked tokens, divided by `total_tokens`.

    logps/old_logps/ref_logps/mask: [B, T] per completion token; advantages: [B]. The KL estimate per
    token is exp(ref - logp) - (ref - logp) - 1 (non-negative, unbiased; Schulman's k3).
    """
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(1)
    clipped_ratio = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)
    kl_sum = 0.0
    if beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probabilities")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        kl_sum = float((kl.detach() * mask).sum())
    # A token is clipped when the clipped term is the smaller one, i.e. its gradient is cut off.
    clipped = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
    return LossParts(
        loss=(per_token * mask).sum() / total_tokens, kl_sum=kl_sum,
        clipped=int((clipped.float() * mask).sum()), tokens=int(mask.sum()),
    )


# ---------------------------------------------------------------- data: prompts per step, rollouts


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


# ---------------------------------------------------------------- one rollout step


def score(samples: Sequence[Sample], rewards: dict, weights: dict[str, float]) -> tuple[dict[str, list[float]], list[float]]:
    """Each reward component per sample (answer always, for the rollout accuracy) and the weighted total."""
    rollouts = [s.rollout for s in samples]
    names = [n for n in rewards if weights.get(n) or n == "answer"]
    parts = {name: rewards[name](rollouts) for name in names}
    total = [sum(weights.get(n, 0.0) * parts[n][i] for n in names) for i in range(len(samples))]
    return parts, total


@contextlib.contextmanager
def reference_policy(model, params: list[torch.Tensor], start_weights: list[torch.Tensor] | None):
    """The model as the KL reference inside the block: the policy GRPO started from.

    With grpo.init_adapter that is the SFT adapter, whose weights (`start_weights`, taken at load) are
    copied into the trainable tensors in place and the current ones copied back after; the base with the
    adapter disabled would pull the policy back to a model that has not learnt the task or its format.
    A fresh adapter starts equal to the base (lora_B = 0): disabling it is the same reference, for free.
    """
    if start_weights is None:
        with model.disable_adapter():
            yield
        return
    current = [p.detach().clone() for p in params]
    for p, start in zip(params, start_weights):
        p.data.copy_(start)  # in place: DeepSpeed's flat-buffer views stay valid
    try:
        yield
    finally:
        for p, now in zip(params, current):
            p.data.copy_(now)


def optimise(accelerator, model, optimizer, scheduler, params, processor, samples, advantages, recipe: Recipe, device,
             token_logps, start_weights: list[torch.Tensor] | None = None) -> dict:
    """`grpo.iterations` optimizer steps on this rank's rollouts, `token_logps` scoring them (train.loss);
    returns summed statistics over all steps."""
    cfg, grpo = recipe.train, recipe.grpo
    micro = [samples[i:i + cfg.batch_size] for i in range(0, len(samples), cfg.batch_size)]
    micro_adv = [advantages[i:i + cfg.batch_size].to(device) for i in range(0, len(samples), cfg.batch_size)]
    batches = [{k: v.to(device) for k, v in sequence_batch(processor, m).items()} for m in micro]
    global_tokens = runtime.global_target_tokens(accelerator, batches)
    with torch.no_grad():
        # Old log-probs are needed only when the policy moves between iterations; with one iteration the
        # ratio is exactly 1 (its value), and the gradient is that of the policy-gradient objective.
        old = [token_logps(model, b, grpo.temperature)[0] for b in batches] if grpo.iterations > 1 else None
        ref = None
        if grpo.beta:
            with reference_policy(accelerator.unwrap_model(model), params, start_weights):
                ref = [token_logps(model, b, grpo.temperature)[0] for b in batches]
    totals = {"loss": 0.0, "kl_sum": 0.0, "clipped": 0, "tokens": 0, "grad_norm": [], "nonfinite": 0}

    def loss_of(i: int) -> torch.Tensor:
        logps, mask = token_logps(model, batches[i], grpo.temperature)
        parts = grpo_loss(logps, old[i] if old else logps.detach(), micro_adv[i], mask, global_tokens,
                          grpo.clip_low, grpo.clip_high, ref[i] if ref else None, grpo.beta)
        totals["kl_sum"] += parts.kl_sum
        totals["clipped"] += parts.clipped
        totals["tokens"] += parts.tokens
        return parts.loss

    for _ in range(grpo.iterations):
        stats = runtime.optimizer_step(accelerator, model, optimizer, scheduler, params, len(batches), loss_of, cfg.max_grad_norm)
        totals["grad_norm"].append(stats["grad_norm"])
        totals["loss"] += stats["rank_loss"]  # summed over ranks in the step's record
        totals["nonfinite"] += not stats["finite"]
    return totals


def step_record(accelerator, step: int, stage: str, lr: float, parts: dict, total: list[float], samples, stats: dict,
                generated: int, rollout_s: float, seconds: float, iterations: int) -> dict:
    """The step's metrics over all ranks."""
    def gathered(values) -> np.ndarray:
        return accelerator.gather(torch.tensor(values, dtype=torch.float64, device=accelerator.device)).cpu().numpy()

    def summed(value: float) -> float:
        return float(accelerator.reduce(torch.tensor(float(value), dtype=torch.float64, device=accelerator.device), reduction="sum"))

    record = {"step": step, "stage": stage, "lr": lr}
    for name, values in {**parts, "total": total}.items():
        all_values = gathered(values)
        record[f"reward/{name}/mean"] = float(all_values.mean())
        record[f"reward/{name}/std"] = float(all_values.std())
    tokens = summed(stats["tokens"])
    record.update({
        "rollout_accuracy": record["reward/answer/mean"],
        "loss": summed(stats["loss"]) / iterations,
        "grad_norm": stats["grad_norm"][-1],
        "kl": summed(stats["kl_sum"]) / max(tokens, 1),
        "clip_fraction": summed(stats["clipped"]) / max(tokens, 1),
        "completion_length": float(gathered([len(s.completion_ids) for s in samples]).mean()),
        "truncated": float(gathered([not s.rollout.finished for s in samples]).mean()),
        "rollout_tokens_per_s": summed(generated) / max(summed(rollout_s) / accelerator.num_processes, 1e-9),
        "skipped": stats["nonfinite"],  # optimizer steps of this rollout step skipped for a non-finite loss
        "step_seconds": seconds,
        "peak_memory_gb": round(runtime.peak_memory_gb(), 3),
    })
    return record


# ---------------------------------------------------------------- main


def load_policy(recipe: Recipe, zero3: bool = False):
    """The thinker with its trainable adapter: the SFT adapter (grpo.init_adapter) or a fresh one placed as in SFT
    (train.runtime.load_model; `zero3`: each rank loads only its shard)."""
    adapter = recipe.grpo.init_adapter
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"grpo.init_adapter={adapter}: no LoRA adapter there (adapter_config.json missing); "
                                "run SFT first (train/sft.py) or set grpo.init_adapter=null")
    return runtime.load_model(recipe, zero3, adapter)


# What a resumed run must share with the run on disk: SFT's sections, the grpo one, and the thinking
# budget the length reward scores against.
GRPO_SECTIONS = ("model", "data", "lora", "train", "grpo")
GRPO_ALSO = ("infer.thinking_budget",)


def check_settings(recipe: Recipe, stage: int) -> None:
    """Refuse GRPO settings that contradict each other or this launch's ZeRO `stage`."""
    cfg, grpo = recipe.train, recipe.grpo
    if not grpo.stages:
        raise RecipeError(f"recipe {recipe.name}: grpo.stages: no curriculum stage given")
    per_rank = cfg.batch_size * cfg.grad_accum
    if per_rank % grpo.num_generations:
        raise RecipeError(f"train.batch_size x train.grad_accum = {per_rank} sequences per rank and step must be a "
                          f"multiple of grpo.num_generations = {grpo.num_generations}")
    if grpo.beta and grpo.init_adapter and stage == 3:
        raise RecipeError("grpo.beta > 0 with grpo.init_adapter needs the whole adapter on every rank (its SFT weights "
                          "are the KL reference): use ZeRO-2 or DDP, or grpo.beta=0")


def main(argv: list[str] | None = None) -> int:
    recipe = recipe_cli(sys.argv[1:] if argv is None else argv, "python train/grpo.py",
                        "GRPO after SFT on audio (see the module docstring for what it writes).")
    cfg, grpo, out = recipe.train, recipe.grpo, Path(recipe.train.output_dir)
    accelerator, log = runtime.launch(recipe, GRPO_SECTIONS, GRPO_ALSO, check=check_settings)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device

    per_rank = cfg.batch_size * cfg.grad_accum
    names = sorted({n for s in grpo.stages for n, w in s.rewards.items() if w} | {"answer"})
    needs_reference = bool({"judge", "embedding"} & set(names))
    schedule = Schedule(grpo.stages, [stage_items(s, cfg.seed, needs_reference) for s in grpo.stages],
                        per_rank // grpo.num_generations, world, rank, cfg.seed)
    total_steps = schedule.total_steps
    rewards = build_rewards(grpo, names, recipe.infer.thinking_budget, "cuda" if torch.cuda.is_available() else "cpu")
    log(f"grpo: {len(grpo.stages)} stage(s) " + ", ".join(f"{s.name}: {s.steps} steps, {len(i)} records, rewards {s.rewards}"
                                                     for s, i in zip(grpo.stages, schedule.items))
        + f"; {schedule.prompts_per_rank} prompts x {grpo.num_generations} completions per rank, {world} rank(s)")

    model, placed = load_policy(recipe, zero3=runtime.zero_stage(accelerator) == 3)
    log(runtime.describe_adapters(model, placed))
    processor = runtime.load_processor(recipe)
    token_logps = make_token_logps(model, cfg.loss_chunk_tokens)
    params = [p for p in model.parameters() if p.requires_grad]
    # The KL reference: the SFT adapter as loaded, before a resume moves the weights (reference_policy).
    start_weights = [p.detach().clone() for p in params] if grpo.beta and grpo.init_adapter else None
    optimizer, scheduler = runtime.make_optimizer(params, cfg, total_steps * grpo.iterations)
    model, optimizer, state, end, metrics_path = runtime.start_session(accelerator, model, optimizer, scheduler, recipe, total_steps, log)
    start, skipped = state["step"], state.get("nonfinite_skipped", 0)
    engine = rollout_engine(accelerator.unwrap_model(model), processor, recipe, str(device))
    rollouts_path = out / "rollouts" / f"rank{rank}.jsonl"
    rollouts_path.parent.mkdir(parents=True, exist_ok=True)
    runtime.reset_metrics(rollouts_path, start)

    bar = progress(total_steps, "grpo", unit="step", initial=start, disable=not accelerator.is_main_process)
    for step in range(start, end):
        tick = time.perf_counter()
        stage_index, items = schedule.prompts(step)
        stage = grpo.stages[stage_index]
        lr = scheduler.get_last_lr()[0]
        model.eval()  # sampling without dropout; a fixed seed per (step, rank) makes a resumed run sample the same
        samples, generated, rollout_s = roll_out(engine, items, recipe, engine.sampling.replace(seed=cfg.seed + 1000 * step + rank))
        model.train()
        parts, total = score(samples, rewards, stage.rewards)
        advantages = group_advantages(torch.tensor(total, dtype=torch.float32), grpo.num_generations, grpo.scale_rewards)
        stats = optimise(accelerator, model, optimizer, scheduler, params, processor, samples, advantages, recipe, device,
                         token_logps, start_weights)
        record = step_record(accelerator, step + 1, stage.name, lr, parts, total, samples, stats, generated, rollout_s,
                             time.perf_counter() - tick, grpo.iterations)
        if stats["nonfinite"]:  # counted per optimizer step, as SFT's train.max_nonfinite_steps
            what = (f"step {step + 1}: loss {record['loss']}, gradient norm {record['grad_norm']} "
                    f"(prompts of this rank: {', '.join(item.id for item in items)}); stopped before its checkpoint")
            skipped = runtime.count_nonfinite(cfg, out, skipped, stats["nonfinite"], what)
            log(f"step {step + 1}: non-finite loss or gradient norm, {stats['nonfinite']} optimizer step(s) skipped "
                f"({skipped} of at most {cfg.max_nonfinite_steps})")
        with rollouts_path.open("a") as handle:
            for i, s in enumerate(samples):
                handle.write(json.dumps({"step": step + 1, "id": s.rollout.id, "text": s.rollout.text,
                                         "answer": s.rollout.parsed.answer, "finished": s.rollout.finished,
                                         "tokens": len(s.completion_ids),
                                         "rewards": {n: v[i] for n, v in parts.items()}, "total": total[i],
                                         "advantage": float(advantages[i])}) + "\n")
        bar.set_postfix(answer=f"{record['reward/answer/mean']:.2f}", loss=f"{record['loss']:.4f}")
        bar.update(1)
        record = {k: runtime.finite_or_null(v) for k, v in record.items()}
        runtime.log_and_save(accelerator, model, recipe, record, metrics_path, end, {"nonfinite_skipped": skipped})
    bar.close()
    runtime.finish(accelerator, model, out, end, total_steps, metrics_path, log)
    return 0


if __name__ == "__main__":
    sys.exit(runtime.cli(main))
