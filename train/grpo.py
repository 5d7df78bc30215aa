"""GRPO on audio after SFT, from a recipe's `grpo` section.

    python train/grpo.py recipes/grpo_tiny.yaml [grpo.beta=0.04 ...]
    accelerate launch --config_file recipes/accelerate/zero2_8gpu.yaml train/grpo.py recipes/grpo_qwen3_omni.yaml

Each rollout step, on every rank: take this rank's prompts of the current curriculum stage, sample
`grpo.num_generations` (G) completions of each with its audio through the inference engine
(`grpo.rollout_engine`: hf `generate` on the policy being trained, or a vLLM engine in this process
that the policy's merged weights are pushed into first: train/rollouts.py), score them with the stage's weighted rewards
(train/rewards.py), normalise the rewards within each prompt's group into advantages, then take
`grpo.iterations` optimizer steps on the clipped-ratio objective, plus `grpo.beta` x KL to the
reference policy: the policy it started from, i.e. the SFT adapter of `grpo.init_adapter` (its weights
swapped in for the reference forward), or the base model for a fresh adapter (no second copy of the model).

Per rank and step the rollouts are `train.batch_size x train.grad_accum` sequences (a multiple of
G): `train.grad_accum` micro-batches of `train.batch_size`. The loss is normalised over the global batch
(all ranks) as `grpo.loss_type` says (train.loss.Normalisation; `dapo`, the default: the mean over every
completion token, as SFT's), and the launch forms, the
optimizer step, checkpoints (adapter + optimizer, scheduler, RNG), resume and provenance are the
trainers' shared runtime (train/runtime.py). The rollouts (prompts per step, sampling, the scoring
batch) are train/rollouts.py; the objective and the per-token log-probabilities are train/loss.py,
where `train.loss_chunk_tokens` scores the completions a chunk of tokens at a time, as SFT's loss.

Writes to `train.output_dir`: recipe.yaml, provenance.jsonl, metrics.jsonl (per step: loss, lr,
grad norm, mean/std of each reward and of the weighted total, rollout accuracy, KL, clip fraction,
completion length, rollout tokens/s; with vLLM rollouts the weight push's seconds and vLLM's log-prob
mismatch to the trainer), rollouts/rank{R}.jsonl (every completion with its rewards),
checkpoints/step-N/ and adapter/.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

# `python train/grpo.py` / `accelerate launch train/grpo.py` put train/ first on sys.path, not the repo.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import qwen_omni as qo  # noqa: E402
from core.progress import progress  # noqa: E402
from core.recipe import Recipe, RecipeError, recipe_cli  # noqa: E402
from train import runtime  # noqa: E402
from train.loss import Normalisation, group_advantages, grpo_loss, make_token_logps, truncated_importance_weights  # noqa: E402
from train.reliance_probe import RelianceProbe  # noqa: E402
from train.rewards import build_rewards  # noqa: E402
from train.rollouts import (  # noqa: E402
    Sample,
    Schedule,
    push_policy,
    roll_out,
    rollout_engine,
    sequence_batch,
    stage_items,
    tensor_parallel_share,
    vllm_rollout_engine,
)

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


def rollout_logps_batch(samples: Sequence[Sample], mask: torch.Tensor) -> torch.Tensor | None:
    """The sampling engine's log-probs laid out as the trainer's [B, T-1] (0 off the completions), or None
    when the engine gave none (hf rollouts)."""
    if any(s.rollout_logps is None for s in samples):
        return None
    values = torch.tensor([v for s in samples for v in s.rollout_logps], dtype=torch.float32, device=mask.device)
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, values)


def optimise(accelerator, model, optimizer, scheduler, params, processor, samples, advantages, recipe: Recipe, device,
             token_logps, start_weights: list[torch.Tensor] | None = None) -> dict:
    """`grpo.iterations` optimizer steps on this rank's rollouts, `token_logps` scoring them (train.loss);
    returns summed statistics over all steps."""
    cfg, grpo = recipe.train, recipe.grpo
    micro = [samples[i:i + cfg.batch_size] for i in range(0, len(samples), cfg.batch_size)]
    micro_adv = [advantages[i:i + cfg.batch_size].to(device) for i in range(0, len(samples), cfg.batch_size)]
    batches = [{k: v.to(device) for k, v in sequence_batch(processor, m).items()} for m in micro]
    norm = Normalisation(grpo.loss_type, runtime.global_target_tokens(accelerator, batches),
                         len(samples) * accelerator.num_processes, grpo.max_new_tokens)
    rollout = [rollout_logps_batch(m, b["labels"][:, 1:] != qo.IGNORE_INDEX) for m, b in zip(micro, batches)]
    with torch.no_grad():
        # Old log-probs are needed only when the policy moves between iterations; with one iteration the
        # ratio is exactly 1 (its value), and the gradient is that of the policy-gradient objective.
        old = [token_logps(model, b, grpo.temperature)[0] for b in batches] if grpo.iterations > 1 else None
        ref = None
        if grpo.beta:
            with reference_policy(accelerator.unwrap_model(model), params, start_weights):
                ref = [token_logps(model, b, grpo.temperature)[0] for b in batches]
    totals = {"loss": 0.0, "kl_sum": 0.0, "clipped": 0, "tokens": 0, "grad_norm": [], "nonfinite": 0,
              "mismatch_sum": 0.0, "mismatch_max": 0.0, "iteration": 0}

    def loss_of(i: int) -> torch.Tensor:
        logps, mask = token_logps(model, batches[i], grpo.temperature)
        trainer_old = old[i] if old else logps.detach()  # the policy that was pushed to the engine and sampled
        weights = None
        if rollout[i] is not None:
            if totals["iteration"] == 0:  # the same old policy every iteration: measured once
                gap = (trainer_old - rollout[i]).abs() * mask
                totals["mismatch_sum"] += float(gap.sum())
                totals["mismatch_max"] = max(totals["mismatch_max"], float(gap.max()) if gap.numel() else 0.0)
            if grpo.rollout_logprobs == "tis":
                weights = truncated_importance_weights(trainer_old, rollout[i], grpo.tis_cap) * mask
        parts = grpo_loss(logps, trainer_old, micro_adv[i], mask, norm, grpo.clip_low, grpo.clip_high,
                          ref[i] if ref else None, grpo.beta, grpo.importance_sampling_level, weights)
        totals["kl_sum"] += parts.kl_sum
        totals["clipped"] += parts.clipped
        totals["tokens"] += parts.tokens
        return parts.loss

    for iteration in range(grpo.iterations):
        totals["iteration"] = iteration
        stats = runtime.optimizer_step(accelerator, model, optimizer, scheduler, params, len(batches), loss_of, cfg.max_grad_norm)
        totals["grad_norm"].append(stats["grad_norm"])
        totals["loss"] += stats["loss"]  # already summed over ranks
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
    if any(s.rollout_logps is not None for s in samples):  # vLLM rollouts: its log-probs against the trainer's
        record["logprob_mismatch_mean"] = summed(stats["mismatch_sum"]) / max(summed(stats["tokens"]) / iterations, 1)
        record["logprob_mismatch_max"] = float(gathered([stats["mismatch_max"]]).max())
    for name, values in {**parts, "total": total}.items():
        all_values = gathered(values)
        record[f"reward/{name}/mean"] = float(all_values.mean())
        record[f"reward/{name}/std"] = float(all_values.std())
    tokens = summed(stats["tokens"])
    record.update({
        "rollout_accuracy": record["reward/answer/mean"],
        "loss": stats["loss"] / iterations,
        "grad_norm": stats["grad_norm"][-1],
        "kl": summed(stats["kl_sum"]) / max(tokens, 1),
        "clip_fraction": summed(stats["clipped"]) / max(tokens, 1),
        "completion_length": float(gathered([len(s.completion_ids) for s in samples]).mean()),
        "truncated": float(gathered([not s.rollout.finished for s in samples]).mean()),
        "rollout_tokens_per_s": summed(generated) / max(summed(rollout_s) / accelerator.num_processes, 1e-9),
        "weight_push_s": summed(stats.get("push_s", 0.0)) / accelerator.num_processes,
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
GRPO_SECTIONS = (*runtime.TRAINING_SECTIONS, "grpo")
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
    tp, world = grpo.vllm.tensor_parallel_size, int(os.environ.get("WORLD_SIZE", "1"))
    if grpo.rollout_engine == "vllm" and world % tp:
        raise RecipeError(f"grpo.vllm.tensor_parallel_size={tp} must divide the {world} ranks")
    if grpo.rollout_logprobs == "tis" and grpo.rollout_engine != "vllm":
        raise RecipeError("grpo.rollout_logprobs=tis weighs tokens by the rollout engine's log-probs: it needs "
                          "grpo.rollout_engine=vllm (the hf engine samples from the policy itself)")
    if grpo.beta and grpo.init_adapter and stage == 3:
        raise RecipeError("grpo.beta > 0 with grpo.init_adapter needs the whole adapter on every rank (its SFT weights "
                          "are the KL reference): use ZeRO-2 or DDP, or grpo.beta=0")


def main(argv: list[str] | None = None) -> int:
    recipe = recipe_cli(sys.argv[1:] if argv is None else argv, "python train/grpo.py",
                        "GRPO after SFT on audio (see the module docstring for what it writes).")
    with runtime.launch(recipe, GRPO_SECTIONS, GRPO_ALSO, check=check_settings) as (accelerator, log):
        return session(recipe, accelerator, log)


def session(recipe: Recipe, accelerator, log) -> int:
    """The session's training, inside runtime.launch (train.output_dir locked)."""
    cfg, grpo, out = recipe.train, recipe.grpo, Path(recipe.train.output_dir)
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
    policy = accelerator.unwrap_model(model)
    # a rollout engine spans grpo.vllm.tensor_parallel_size consecutive ranks (1 with hf rollouts): they sample together
    tp = grpo.vllm.tensor_parallel_size if grpo.rollout_engine == "vllm" else 1
    if grpo.rollout_engine == "vllm":
        engine = vllm_rollout_engine(recipe, processor, rank // tp, world > 1)
        push_dtype = next(p for p in policy.parameters() if not p.requires_grad).dtype
    else:
        engine = rollout_engine(policy, processor, recipe, str(device))
    rollouts_path = out / "rollouts" / f"rank{rank}.jsonl"
    rollouts_path.parent.mkdir(parents=True, exist_ok=True)
    runtime.reset_metrics(rollouts_path, start)

    probe = RelianceProbe.for_recipe(recipe)  # grpo.reliance_every: held-out answers with and without the audio
    bar = progress(total_steps, "grpo", unit="step", initial=start, disable=not accelerator.is_main_process)
    for step in range(start, end):
        tick = time.perf_counter()
        stage_index, items = schedule.prompts(step)
        stage = grpo.stages[stage_index]
        lr = scheduler.get_last_lr()[0]
        model.eval()  # sampling without dropout; a fixed seed per (step, rank) makes a resumed run sample the same
        push_s = 0.0
        if grpo.rollout_engine == "vllm":  # the policy as it is now (after the last optimizer step) into the engine
            _, push_s = push_policy(engine, policy, push_dtype)
        shared, mine = tensor_parallel_share(items, tp, rank)
        samples, _, rollout_s = roll_out(engine, processor, shared, recipe,
                                         engine.sampling.replace(seed=cfg.seed + 1000 * step + rank // tp))
        samples = samples[mine.start * grpo.num_generations:mine.stop * grpo.num_generations]
        generated = sum(len(s.completion_ids) for s in samples)
        model.train()
        parts, total = score(samples, rewards, stage.rewards)
        advantages = group_advantages(torch.tensor(total, dtype=torch.float32), grpo.num_generations, grpo.scale_rewards)
        stats = optimise(accelerator, model, optimizer, scheduler, params, processor, samples, advantages, recipe, device,
                         token_logps, start_weights)
        stats["push_s"] = push_s
        record = step_record(accelerator, step + 1, stage.name, lr, parts, total, samples, stats, generated, rollout_s,
                             time.perf_counter() - tick, grpo.iterations)
        if probe is not None:
            record.update(probe.at(step + 1, model, engine))
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
