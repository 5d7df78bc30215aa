"""LoRA SFT of the Qwen3-Omni thinker, from a recipe.

    python train/sft.py recipes/tiny.yaml [train.lr=1e-3 ...]
    accelerate launch --config_file recipes/accelerate/zero3_8gpu.yaml train/sft.py recipes/cogito.yaml

Writes to `train.output_dir`:
    recipe.yaml                  the resolved recipe
    provenance.jsonl             per session: git commit/dirty state (+ patch), packages, machine
    metrics.jsonl                one line per logged optimizer step (loss, lr, grad_norm, throughput, memory)
    seen/rank{R}.jsonl           the sample ids each rank trained on, per step
    data_cache/                  the rendered, tokenised training records (train/data_cache.py; `data.cache` moves it)
    checkpoints/step-N/          adapter/ + Accelerate state (optimizer, scheduler, RNG); the newest K are kept
    adapter/                     the final LoRA adapter (train/merge.py folds it into the base weights)

The loss is the mean over every target token of the global accumulated batch (all micro-batches
of all ranks), so neither padding, sample lengths, gradient accumulation nor the number of ranks
changes what one optimizer step means. The data order is a pure function of (seed, step): a run
resumed from a checkpoint replays exactly what an uninterrupted run does.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import torch

# `python train/sft.py` / `accelerate launch train/sft.py` put train/ first on sys.path, not the repo.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import Accelerator, InitProcessGroupKwargs  # noqa: E402
from accelerate.utils import DistributedType, set_seed  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from core import qwen_omni as qo  # noqa: E402
from core.items import DataError  # noqa: E402
from core.progress import library_bars_off_a_terminal, progress  # noqa: E402
from core.provenance import record_session  # noqa: E402
from core.recipe import Recipe, RecipeError, changed_settings, recipe_cli, result_keys, save_recipe  # noqa: E402
from train.data import SFTCollator, SFTDataset, build_examples, epoch_batches, feature_cache_for  # noqa: E402
from train.lora import apply_lora  # noqa: E402
from train.loss import make_loss, model_loss  # noqa: E402
from train.zero3 import load_thinker_zero3  # noqa: E402

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"  # written last: a checkpoint without it is incomplete and ignored


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, settings that contradict the run on disk); the message says why."""


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup, then decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


def make_accelerator(recipe: Recipe) -> Accelerator:
    cfg = recipe.train
    if cfg.report_to == "wandb" and not os.environ.get("WANDB_API_KEY") and "api.wandb.ai" not in _netrc():
        os.environ.setdefault("WANDB_MODE", "offline")  # no key: log locally, `wandb sync` later
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=cfg.output_dir,
        # Without an explicit gloo backend, CPU processes each believe they are alone.
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if _cpu_multiprocess() else [],
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # We hand DeepSpeed no dataloader, so it cannot infer these "auto" values itself.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
        ds_config["gradient_clipping"] = cfg.max_grad_norm
    return accelerator


def _cpu_multiprocess() -> bool:
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _netrc() -> str:
    path = Path.home() / ".netrc"
    return path.read_text() if path.is_file() else ""


def zero_stage(accelerator: Accelerator) -> int:
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return 0
    return accelerator.state.deepspeed_plugin.zero_stage


def keep_trainable_weights(models, weights, output_dir) -> None:
    """Accelerate pre-save hook: checkpoint the adapter, not a copy of the frozen base model."""
    for model, state in zip(models, weights):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        for key in [k for k in state if k not in trainable]:
            del state[key]


def save_adapter(accelerator: Accelerator, model, path: Path) -> None:
    unwrapped = accelerator.unwrap_model(model)
    gather = contextlib.nullcontext()
    if zero_stage(accelerator) == 3:  # adapter weights are sharded: gather them (all ranks take part)
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for p in unwrapped.parameters() if p.requires_grad])
    with gather:
        if accelerator.is_main_process:
            # the base lm_head/embeddings are never trained here: keep them out even when lm_head has LoRA
            unwrapped.save_pretrained(str(path), save_embedding_layers=False)


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [p for p in (output_dir / "checkpoints").glob(CHECKPOINT_PREFIX + "*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(accelerator: Accelerator, model, output_dir: Path, step: int, keep_last: int, state: dict) -> Path:
    path = output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
    # DeepSpeed writes model + optimizer itself; the frozen base weights need not be in every checkpoint.
    accelerator.save_state(str(path), **({"exclude_frozen_parameters": True} if zero_stage(accelerator) else {}))
    save_adapter(accelerator, model, path / "adapter")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (path / STATE_FILE).write_text(json.dumps({"step": step, **state}))
        for old in checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return path


def resume(accelerator: Accelerator, output_dir: Path) -> dict:
    """Load the newest complete checkpoint; returns its state: the optimizer step it was taken after (0: none), ..."""
    found = checkpoints(output_dir)
    if not found:
        return {"step": 0}
    latest = found[-1]
    # Only the adapter is in the checkpoint, so the base weights are left as loaded.
    strict = {"load_module_strict": False} if zero_stage(accelerator) else {"strict": False}
    accelerator.load_state(str(latest), **strict)
    return json.loads((latest / STATE_FILE).read_text())


def reset_metrics(path: Path, start: int) -> None:
    """Keep the JSONL lines of steps up to `start` (the resumed checkpoint): steps after it are redone."""
    keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= start] \
        if path.is_file() and start else []
    path.write_text("".join(line + "\n" for line in keep))


def windows(dataset, collator, lengths, recipe: Recipe, rank: int, world: int, steps_per_epoch: int, start: int, total: int):
    """(step, epoch, micro-batches) for each optimizer step from `start` to `total`, for this rank."""
    cfg = recipe.train
    step = start
    while step < total:
        epoch, window = divmod(step, steps_per_epoch)
        batches = epoch_batches(lengths, cfg.batch_size, cfg.grad_accum, world, rank, cfg.seed, epoch, cfg.group_by_length)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=batches[window * cfg.grad_accum:], collate_fn=collator,
            num_workers=recipe.data.num_workers, pin_memory=torch.cuda.is_available(),
            # its own generator: a fresh loader must not draw from the global RNG (dropout), or a
            # resumed run would see different dropout masks than an uninterrupted one
            generator=torch.Generator().manual_seed(cfg.seed + epoch),
        )
        micro = []
        for batch in loader:
            micro.append(batch)
            if len(micro) == cfg.grad_accum:
                yield step, epoch, micro
                micro, step = [], step + 1
                if step == total:
                    return


def train_step(accelerator: Accelerator, model, optimizer, scheduler, params, micro: list[dict], max_grad_norm: float,
               loss_fn=model_loss) -> dict:
    """One optimizer step over this rank's micro-batches; the loss is per target token of the global batch
    (`loss_fn`: train.loss.model_loss, or a ChunkedLoss; both divide by the global target-token count)."""
    device = accelerator.device
    # The model shifts labels by one inside its loss: a target token is a label at position >= 1.
    local_tokens = sum(int((b["labels"][:, 1:] != qo.IGNORE_INDEX).sum()) for b in micro)
    global_tokens = accelerator.reduce(torch.tensor(local_tokens, device=device), reduction="sum")
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(micro):
        inputs = {k: v.to(device) for k, v in batch.items() if k != "ids"}
        with accelerator.accumulate(model):
            assert accelerator.sync_gradients == (i == len(micro) - 1), "accumulation window out of step"
            # loss = (sum of this micro-batch's token losses) / (target tokens of the whole global batch)
            loss = loss_fn(model, inputs, global_tokens)
            # DDP/ZeRO average gradients over ranks and Accelerate/DeepSpeed divide by grad_accum: undo both,
            # so the summed gradient is exactly that of the global per-token mean.
            accelerator.backward(loss * accelerator.num_processes * len(micro))
            loss_sum += loss.detach()
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    loss = accelerator.reduce(loss_sum, reduction="sum").item()
    grad_norm = float(grad_norm) if grad_norm is not None else None
    # Loss and norm are global (reduced), so every rank takes the same decision.
    finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
    if finite:  # a non-finite step updates nothing; the caller stops or skips it
        optimizer.step()
    scheduler.step()  # the schedule stays a function of the step, skipped or not
    optimizer.zero_grad()
    return {"loss": loss, "grad_norm": grad_norm, "target_tokens": int(global_tokens), "finite": finite}


def finite_or_null(value):
    """JSON has no NaN or infinity: metrics.jsonl writes null for them."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: peak RSS (KiB on Linux)


def prepare_for_training(model, recipe: Recipe):
    """Gradient checkpointing as the recipe says, then LoRA; returns (model, adapters per group)."""
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return apply_lora(model, recipe.lora)


def start_session(accelerator: Accelerator, model, optimizer, scheduler, recipe: Recipe, total_steps: int, log):
    """Prepare the model and optimizer, checkpoint the scheduler with them (adapter weights only), resume
    from the newest checkpoint, start the trackers and the metrics file.

    Returns (model, optimizer, the resumed checkpoint's state ({"step": 0} when none), step to stop after
    in this session, metrics path).
    """
    cfg, out = recipe.train, Path(recipe.train.output_dir)
    # The scheduler is stepped by hand once per optimizer step (Accelerate would step it once per rank).
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_save_state_pre_hook(keep_trainable_weights)
    state = resume(accelerator, out) if cfg.resume else {"step": 0}
    if state["step"]:
        log(f"resume: from {out}/checkpoints/{CHECKPOINT_PREFIX}{state['step']}")
    end = min(total_steps, cfg.stop_after or total_steps)
    accelerator.init_trackers(cfg.wandb_project, config=recipe.model_dump(mode="json"),
                              init_kwargs={"wandb": {"name": recipe.name, "dir": str(out)}})
    metrics_path = out / "metrics.jsonl"
    if accelerator.is_main_process:
        reset_metrics(metrics_path, state["step"])
    return model, optimizer, state, end, metrics_path


def log_and_save(accelerator: Accelerator, model, recipe: Recipe, record: dict, metrics_path: Path, end: int,
                 state: dict | None = None) -> None:
    """After optimizer step `record["step"]`: its metrics every `train.log_every` steps, a checkpoint (with
    `state` beside the step) every `train.save_every` steps, and both after this session's last step (`end`)."""
    cfg, step = recipe.train, record["step"]
    if step % cfg.log_every == 0 or step == end:
        accelerator.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}, step=step)
        if accelerator.is_main_process:
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
    if step % cfg.save_every == 0 or step == end:
        save_checkpoint(accelerator, model, Path(cfg.output_dir), step, cfg.keep_last, state or {})


def finish(accelerator: Accelerator, model, out: Path, end: int, total_steps: int, metrics_path: Path, log) -> None:
    """The final adapter when the schedule is done; otherwise a note that a rerun resumes."""
    if end < total_steps:
        log(f"stopped after step {end} of {total_steps} (train.stop_after); run again to resume")
    else:
        save_adapter(accelerator, model, out / "adapter")
        log(f"done: adapter in {out / 'adapter'}, metrics in {metrics_path}")
    accelerator.end_training()


def check_nonfinite_skipping(accelerator: Accelerator, cfg) -> None:
    if cfg.max_nonfinite_steps and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise TrainingError("train.max_nonfinite_steps > 0 cannot skip steps under DeepSpeed (its engine updates "
                            "inside backward); set it to 0: training then stops at a non-finite loss")


def count_nonfinite(cfg, out: Path, skipped: int, new: int, what: str) -> int:
    """`skipped` + `new` non-finite optimizer steps; past train.max_nonfinite_steps a TrainingError: `what`
    (the step, its loss and norm, its samples), the steps skipped before and the newest checkpoint."""
    skipped += new
    if skipped > cfg.max_nonfinite_steps:
        newest = checkpoints(out)
        raise TrainingError(
            what + (f" ({skipped - new} skipped before, train.max_nonfinite_steps={cfg.max_nonfinite_steps})" if skipped > new else "")
            + f"; newest checkpoint: {newest[-1] if newest else 'none'}")
    return skipped


def check_resumable(recipe: Recipe, out: Path, sections: tuple[str, ...] = ("model", "data", "lora", "train"),
                    also: tuple[str, ...] = ()) -> None:
    """A run folder that holds checkpoints or an adapter may only be continued with the settings that made them:
    every key of the recipe's `sections` and the single keys `also` that changes results (core.recipe.result_keys)."""
    if not (out / "recipe.yaml").is_file() or not (checkpoints(out) or (out / "adapter").is_dir()):
        return
    changed = changed_settings(out / "recipe.yaml", recipe, result_keys(recipe, sections + also))
    if changed:
        raise TrainingError(f"{out}: holds a run made with other settings ({out / 'recipe.yaml'}); continuing would "
                            "mix two runs. Differing: " + "; ".join(changed)
                            + ". Restore them, or choose another train.output_dir")


def main(argv: list[str] | None = None) -> int:
    recipe = recipe_cli(sys.argv[1:] if argv is None else argv, "python train/sft.py",
                        "LoRA SFT of the Qwen3-Omni thinker (see the module docstring for what it writes).")
    cfg = recipe.train
    out = Path(cfg.output_dir)
    check_resumable(recipe, out)  # every rank, before any of them writes
    library_bars_off_a_terminal()
    accelerator = make_accelerator(recipe)
    stage = zero_stage(accelerator)
    if cfg.zero_stage is not None and cfg.zero_stage != stage:
        raise ValueError(f"train.zero_stage={cfg.zero_stage} (the recipe's memory plan: python -m train.memory RECIPE) "
                         f"but this launch runs ZeRO stage {stage}: use an accelerate config of stage {cfg.zero_stage} "
                         f"(recipes/accelerate/) or override train.zero_stage")
    if stage == 3 and cfg.loss_chunk_tokens:
        # ZeRO-3 gathers the sharded lm_head at each call: the chunks call it a different number of
        # times per rank, and their recomputation in backward finds it released (tried on 2 CPU ranks).
        raise ValueError("train.loss_chunk_tokens is not supported under ZeRO-3 (the lm_head is sharded); "
                         "use it with ZeRO-2 or one process, or set train.loss_chunk_tokens=null")
    rank, world = accelerator.process_index, accelerator.num_processes
    log = partial(tqdm.write) if accelerator.is_main_process else (lambda *_: None)
    set_seed(cfg.seed)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_recipe(recipe, out / "recipe.yaml")
        record_session(out)  # code, packages and machine of this session, for reproducibility audits

    # Data: one process builds the on-disk cache, every rank maps it; epoch_batches gives each rank its own slice.
    processor = qo.OmniProcessor.from_pretrained(recipe.model.path, allow_hub=recipe.model.allow_hub)
    examples = build_examples(recipe.data, processor, recipe.model.prompt_style, cfg.seed, log, cache_dir=out / "data_cache")
    dataset = SFTDataset(examples, recipe.data.max_audio_seconds, feature_cache_for(recipe.data, processor))
    collator = SFTCollator(processor)
    global_batch = cfg.batch_size * world * cfg.grad_accum
    steps_per_epoch = len(examples) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(examples)} samples make no full step of {global_batch} (batch_size x ranks x grad_accum)")
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    log(f"train: {len(examples)} samples, {global_batch} per step on {world} rank(s), "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps")

    # Model: LoRA on the text attention (and experts if asked); the audio tower and visual stay frozen.
    # Under ZeRO-3 each rank creates its 1/world shard of every parameter and fills it straight from the
    # checkpoint (train.zero3): no process holds the full model.
    model = (load_thinker_zero3 if stage == 3 else qo.load_thinker)(
        recipe.model.path, recipe.model.dtype, attn_implementation=recipe.model.attn_implementation,
        experts_implementation=recipe.model.experts_implementation, allow_hub=recipe.model.allow_hub)
    model, placed = prepare_for_training(model, recipe)
    trainable = sum(qo.full_numel(p) for p in model.parameters() if p.requires_grad)
    log("lora: adapted modules " + ", ".join(f"{g}={placed[g]}" for g in ("text_attention", "experts", "audio_tower", "other"))
        + f"; {trainable:,} trainable of {sum(qo.full_numel(p) for p in model.parameters()):,} parameters")
    loss_fn = make_loss(model, cfg.loss_chunk_tokens)
    if stage == 3:
        from deepspeed.utils import set_z3_leaf_modules

        # ZeRO-3 would hang waiting for the parameters of experts that got no tokens on some rank.
        set_z3_leaf_modules(model, [qo.moe_block_class()])
    # Router aux loss stays off (the config default): every LoRA tensor, the fused expert ones
    # included, then takes part in every forward, so DDP/ZeRO-2 never wait on an unused parameter.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, total=total_steps, warmup=warmup, schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio)
    )
    check_nonfinite_skipping(accelerator, cfg)
    model, optimizer, state, end, metrics_path = start_session(accelerator, model, optimizer, scheduler, recipe, total_steps, log)
    start, skipped = state["step"], state.get("nonfinite_skipped", 0)
    seen_path = out / "seen" / f"rank{rank}.jsonl"
    seen_path.parent.mkdir(parents=True, exist_ok=True)
    if seen_path.is_file():  # like the metrics: the steps after the checkpoint are redone
        seen_path.write_text("".join(line + "\n" for line in seen_path.read_text().splitlines()
                                     if start and json.loads(line)["step"] <= start))

    model.train()
    bar = progress(total_steps, "sft", unit="step", initial=start, disable=not accelerator.is_main_process)
    lengths = examples.lengths
    tick = time.perf_counter()
    for step, epoch, micro in windows(dataset, collator, lengths, recipe, rank, world, steps_per_epoch, start, end):
        lr = scheduler.get_last_lr()[0]
        stats = train_step(accelerator, model, optimizer, scheduler, params, micro, cfg.max_grad_norm, loss_fn)
        seconds, tick = time.perf_counter() - tick, time.perf_counter()
        ids = [i for b in micro for i in b["ids"]]
        if not stats["finite"]:
            skipped = count_nonfinite(cfg, out, skipped, 1, f"step {step + 1}: loss {stats['loss']}, gradient norm "
                                      f"{stats['grad_norm']} (samples of this rank: {', '.join(ids)}); stopped before any update or checkpoint")
            log(f"step {step + 1}: non-finite loss or gradient norm, skipped ({skipped} of at most {cfg.max_nonfinite_steps})")
        with seen_path.open("a") as handle:
            handle.write(json.dumps({"step": step + 1, "ids": ids}) + "\n")
        record = {
            "step": step + 1, "epoch": round(epoch + (step % steps_per_epoch + 1) / steps_per_epoch, 4), "lr": lr,
            **{k: finite_or_null(v) for k, v in stats.items() if k != "finite"}, "skipped": not stats["finite"],
            "target_tokens_per_s": stats["target_tokens"] / seconds, "samples_per_s": global_batch / seconds,
            "peak_memory_gb": round(peak_memory_gb(), 3),
        }
        bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{lr:.2e}")
        bar.update(1)
        log_and_save(accelerator, model, recipe, record, metrics_path, end, {"nonfinite_skipped": skipped})
    bar.close()
    finish(accelerator, model, out, end, total_steps, metrics_path, log)
    return 0


def cli(argv: list[str] | None = None, entry=None) -> int:
    """`main` (or train/grpo.py's, `entry`) with input errors printed as one message (file, record, field),
    without a traceback."""
    try:
        return (entry or main)(argv)
    except (RecipeError, DataError, TrainingError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if not isinstance(err, TrainingError) else 1


if __name__ == "__main__":
    sys.exit(cli())
