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
resumed from a checkpoint replays exactly what an uninterrupted run does. Launch checks, model
loading, the optimizer step, checkpoints and resume are the trainers' shared runtime (train/runtime.py).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

# `python train/sft.py` / `accelerate launch train/sft.py` put train/ first on sys.path, not the repo.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.items import DataError  # noqa: E402
from core.progress import progress  # noqa: E402
from core.recipe import Recipe, recipe_cli  # noqa: E402
from train import runtime  # noqa: E402
from train.data import SFTCollator, SFTDataset, build_examples, epoch_batches, feature_cache_for  # noqa: E402
from train.loss import make_loss, model_loss  # noqa: E402


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


def train_step(accelerator, model, optimizer, scheduler, params, micro: list[dict], max_grad_norm: float,
               loss_fn=model_loss) -> dict:
    """One optimizer step over this rank's micro-batches; the loss is per target token of the global batch
    (`loss_fn`: train.loss.model_loss, or a ChunkedLoss; both divide by the global target-token count)."""
    global_tokens = runtime.global_target_tokens(accelerator, micro)

    def loss_of(i: int) -> torch.Tensor:
        inputs = {k: v.to(accelerator.device) for k, v in micro[i].items() if k != "ids"}
        # (sum of this micro-batch's token losses) / (target tokens of the whole global batch)
        return loss_fn(model, inputs, global_tokens)

    stats = runtime.optimizer_step(accelerator, model, optimizer, scheduler, params, len(micro), loss_of, max_grad_norm)
    return {"loss": stats["loss"], "grad_norm": stats["grad_norm"], "target_tokens": int(global_tokens),
            "finite": stats["finite"]}


def main(argv: list[str] | None = None) -> int:
    recipe = recipe_cli(sys.argv[1:] if argv is None else argv, "python train/sft.py",
                        "LoRA SFT of the Qwen3-Omni thinker (see the module docstring for what it writes).")
    with runtime.launch(recipe) as (accelerator, log):
        return session(recipe, accelerator, log)


def session(recipe: Recipe, accelerator, log) -> int:
    """The session's training, inside runtime.launch (train.output_dir locked)."""
    cfg, out = recipe.train, Path(recipe.train.output_dir)
    rank, world = accelerator.process_index, accelerator.num_processes

    # Data: one process builds the on-disk cache, every rank maps it; epoch_batches gives each rank its own slice.
    processor = runtime.load_processor(recipe)
    examples = build_examples(recipe.data, processor, recipe.model.prompt_style, cfg.seed, log, cache_dir=out / "data_cache")
    dataset = SFTDataset(examples, recipe.data.max_audio_seconds, feature_cache_for(recipe.data, processor))
    collator = SFTCollator(processor)
    global_batch = cfg.batch_size * world * cfg.grad_accum
    steps_per_epoch = len(examples) // global_batch
    if steps_per_epoch == 0:
        raise DataError(f"data.train: {len(examples)} samples make no full step of {global_batch} "
                        f"(train.batch_size x ranks x train.grad_accum)")
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    log(f"train: {len(examples)} samples, {global_batch} per step on {world} rank(s), "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps")

    # Model: LoRA on the text attention (and experts if asked), fresh or the train.init_adapter one.
    model, placed = runtime.load_model(recipe, zero3=runtime.zero_stage(accelerator) == 3, adapter=cfg.init_adapter)
    log(runtime.describe_adapters(model, placed))
    loss_fn = make_loss(model, cfg.loss_chunk_tokens)
    # Router aux loss stays off (the config default): every LoRA tensor, the fused expert ones
    # included, then takes part in every forward, so DDP/ZeRO-2 never wait on an unused parameter.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = runtime.make_optimizer(params, cfg, total_steps)
    model, optimizer, state, end, metrics_path = runtime.start_session(accelerator, model, optimizer, scheduler, recipe, total_steps, log)
    start, skipped = state["step"], state.get("nonfinite_skipped", 0)
    seen_path = out / "seen" / f"rank{rank}.jsonl"
    seen_path.parent.mkdir(parents=True, exist_ok=True)
    runtime.reset_metrics(seen_path, start)  # like the metrics: the steps after the checkpoint are redone

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
            what = (f"step {step + 1}: loss {stats['loss']}, gradient norm {stats['grad_norm']} "
                    f"(samples of this rank: {', '.join(ids)}); stopped before any update or checkpoint")
            skipped = runtime.count_nonfinite(cfg, out, skipped, 1, what)
            log(f"step {step + 1}: non-finite loss or gradient norm, skipped ({skipped} of at most {cfg.max_nonfinite_steps})")
        with seen_path.open("a") as handle:
            handle.write(json.dumps({"step": step + 1, "ids": ids}) + "\n")
        record = {
            "step": step + 1, "epoch": round(epoch + (step % steps_per_epoch + 1) / steps_per_epoch, 4), "lr": lr,
            **{k: runtime.finite_or_null(v) for k, v in stats.items() if k != "finite"}, "skipped": not stats["finite"],
            "target_tokens_per_s": stats["target_tokens"] / seconds, "samples_per_s": global_batch / seconds,
            "peak_memory_gb": round(runtime.peak_memory_gb(), 3),
        }
        bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{lr:.2e}")
        bar.update(1)
        runtime.log_and_save(accelerator, model, recipe, record, metrics_path, end, {"nonfinite_skipped": skipped})
    bar.close()
    runtime.finish(accelerator, model, out, end, total_steps, metrics_path, log)
    return 0


if __name__ == "__main__":
    sys.exit(runtime.cli(main))
