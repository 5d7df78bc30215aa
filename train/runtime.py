"""What both trainers (train/sft.py, train/grpo.py) run on: launch and setting checks, the model and
processor as the recipe says, AdamW with its schedule, the optimizer step with its finite checks,
checkpoints and resume, metrics, and the command line's one-line errors.

One optimizer step (`optimizer_step`) is the same in both: the loss of each micro-batch is its share
of the mean over every target token of the global accumulated batch (all micro-batches of all
ranks), backward undoes DDP's average over ranks and the division by grad_accum, then clip, one
decision for all ranks whether the step is finite, the update (or none), the schedule's step.

A checkpoint, checkpoints/step-N/, holds adapter/ and the Accelerate state (optimizer, scheduler,
RNG), then trainer_state.json (written to a temporary name and renamed) and, last, the COMPLETE marker:
only a checkpoint with the marker and a state that parses is resumed from; any other is skipped with a
warning naming it (the previous complete one is used). The newest `train.keep_last` are kept. A full
disk while writing one is a DiskFull error naming the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import sys
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from core import qwen_omni as qo
from core.items import DataError
from core.locks import LockBusy, file_lock, holder_note
from core.outdir import DiskFull, naming_full_disk, replacing
from core.progress import library_bars_off_a_terminal
from core.provenance import record_session
from core.recipe import Recipe, RecipeError, changed_settings, result_keys, save_recipe
from train.lora import GROUPS, apply_lora, placement
from train.zero3 import load_thinker_zero3

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"
COMPLETE = "COMPLETE"  # written after everything else: a checkpoint without it is incomplete and ignored


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, settings that contradict the run on disk); the message says why."""


def cli(entry: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """A trainer's `main` (`entry`) with input errors printed as one line `error: ...` (file, record or key),
    without a traceback: exit status 2 for the recipe and the data, 1 for the run's state."""
    try:
        return entry(argv)
    except (RecipeError, DataError, TrainingError, FileNotFoundError, DiskFull, qo.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1 if isinstance(err, (TrainingError, DiskFull)) else 2


# ---------------------------------------------------------------- launch and setting checks


def make_accelerator(recipe: Recipe) -> Accelerator:
    cfg = recipe.train
    if cfg.report_to == "wandb" and not os.environ.get("WANDB_API_KEY") and "api.wandb.ai" not in _netrc():
        os.environ.setdefault("WANDB_MODE", "offline")  # no key: log locally, `wandb sync` later
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=cfg.output_dir,
        # CPU ranks started by torchrun (the MULTI_GPU launcher with use_cpu, recipes/accelerate/cpu_ddp_2proc.yaml):
        # without cpu=True Accelerate 1.15 takes them for single processes (DistributedType.NO: no DDP, no gradient
        # all-reduce, each rank training its own copy on its half); with it they are MULTI_CPU over gloo.
        cpu=_cpu_multiprocess() and not _deepspeed_launch(),
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


def _deepspeed_launch() -> bool:
    # set by `accelerate launch` for a DeepSpeed config; cpu=True would drop the DeepSpeed plugin
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _netrc() -> str:
    path = Path.home() / ".netrc"
    return path.read_text() if path.is_file() else ""


def zero_stage(accelerator: Accelerator) -> int:
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return 0
    return accelerator.state.deepspeed_plugin.zero_stage


def check_launch(accelerator: Accelerator, recipe: Recipe) -> None:
    """Refuse train settings this launch cannot run as planned."""
    cfg, stage = recipe.train, zero_stage(accelerator)
    if cfg.zero_stage is not None and cfg.zero_stage != stage:
        raise RecipeError(f"train.zero_stage={cfg.zero_stage} (the recipe's memory plan: python -m train.memory RECIPE) "
                          f"but this launch runs ZeRO stage {stage}: use an accelerate config of stage {cfg.zero_stage} "
                          f"(recipes/accelerate/) or override train.zero_stage")
    if stage == 3 and cfg.loss_chunk_tokens:
        # ZeRO-3 gathers the sharded lm_head at each call: the chunks call it a different number of
        # times per rank, and their recomputation in backward finds it released (tried on 2 CPU ranks).
        raise RecipeError("train.loss_chunk_tokens is not supported under ZeRO-3 (the lm_head is sharded); "
                          "use it with ZeRO-2 or one process, or set train.loss_chunk_tokens=null")
    if cfg.max_nonfinite_steps and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise RecipeError("train.max_nonfinite_steps > 0 cannot skip steps under DeepSpeed (its engine updates "
                          "inside backward); set it to 0: training then stops at a non-finite loss")


# The recipe sections an SFT run reads: what a resumed run must share with the run on disk (GRPO adds its own).
TRAINING_SECTIONS = ("model", "data", "lora", "train")


def check_resumable(recipe: Recipe, out: Path, sections: tuple[str, ...] = TRAINING_SECTIONS,
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


LOCK = "train.lock"  # in train.output_dir, held by rank 0 for the whole session


def from_rank0(value):
    """Rank 0's `value`, on every rank. torch.distributed itself: Accelerate's broadcast does nothing where it
    labels the launch not distributed, as it does the CPU launch of recipes/accelerate/cpu_ddp_2proc.yaml
    (DistributedType.NO on each of its 2 ranks, accelerate 1.15)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return value


@contextlib.contextmanager
def launch(recipe: Recipe, sections: tuple[str, ...] = TRAINING_SECTIONS, also: tuple[str, ...] = (),
           check: Callable[[Recipe, int], None] | None = None) -> Iterator[tuple[Accelerator, Callable[[str], None]]]:
    """A training session, held open by the block: create the accelerator; rank 0 locks train.output_dir
    (another run writing it is an error naming it and its holder, on every rank); refuse a run folder made
    with other settings (check_resumable over `sections` and `also`) and settings this launch cannot run
    (check_launch, then the trainer's own `check(recipe, ZeRO stage)`), all before anything is written; then
    seed, and save the resolved recipe and this session's provenance (code, packages, machine).
    Yields (accelerator, log: prints on rank 0); the lock is released when the block ends."""
    cfg, out = recipe.train, Path(recipe.train.output_dir)
    library_bars_off_a_terminal()
    accelerator = make_accelerator(recipe)
    with contextlib.ExitStack() as held:
        busy = None
        if accelerator.is_main_process:
            try:
                held.enter_context(file_lock(out / LOCK, wait=False, note=holder_note()))
            except LockBusy as err:
                busy = err.holder
        busy = from_rank0(busy)  # every rank learns the outcome: all stop together, none waits in a collective
        if busy is not None:
            raise TrainingError(f"{out}: another training run is writing this train.output_dir ({busy}); "
                                "wait for it to finish, or choose another train.output_dir")
        check_resumable(recipe, out, sections, also)  # every rank, before any of them writes
        check_launch(accelerator, recipe)
        if check is not None:
            check(recipe, zero_stage(accelerator))
        log = partial(tqdm.write) if accelerator.is_main_process else (lambda *_: None)
        set_seed(cfg.seed)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_recipe(recipe, out / "recipe.yaml")
            record_session(out)
        yield accelerator, log


# ---------------------------------------------------------------- model, optimizer, schedule


def load_processor(recipe: Recipe) -> qo.OmniProcessor:
    return qo.OmniProcessor.from_pretrained(recipe.model.path, allow_hub=recipe.model.allow_hub)


def prepare_for_training(model, recipe: Recipe, adapter: str | Path | None = None):
    """Gradient checkpointing as the recipe says, then a fresh LoRA placed as it says, or the LoRA
    `adapter` folder, trainable; returns (model, adapted modules per group)."""
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapter is None:
        return apply_lora(model, recipe.lora)
    model = qo.load_adapter(model, adapter, is_trainable=True)
    return model, placement(model)


def load_model(recipe: Recipe, zero3: bool = False, adapter: str | Path | None = None):
    """The thinker of the recipe's model section, ready to train (prepare_for_training); the audio tower and
    visual stay frozen. Returns (model, adapted modules per group).

    Under ZeRO-3 (`zero3`) each rank creates its 1/world shard of every parameter and reads its own
    weights straight into its own partition (train.zero3): no process holds the full model.
    """
    model = (load_thinker_zero3 if zero3 else qo.load_thinker)(
        recipe.model.path, recipe.model.dtype, attn_implementation=recipe.model.attn_implementation,
        experts_implementation=recipe.model.experts_implementation, allow_hub=recipe.model.allow_hub)
    model, placed = prepare_for_training(model, recipe, adapter)
    if zero3:
        from deepspeed.utils import set_z3_leaf_modules

        # ZeRO-3 would hang waiting for the parameters of experts that got no tokens on some rank.
        set_z3_leaf_modules(model, [qo.moe_block_class()])
    return model, placed


def describe_adapters(model, placed) -> str:
    trainable = sum(qo.full_numel(p) for p in model.parameters() if p.requires_grad)
    return ("lora: adapted modules " + ", ".join(f"{g}={placed[g]}" for g in GROUPS)
            + f"; {trainable:,} trainable of {sum(qo.full_numel(p) for p in model.parameters()):,} parameters")


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup, then decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


def make_optimizer(params: list[torch.Tensor], cfg, total_steps: int):
    """AdamW on `params` and its LR schedule over `total_steps` optimizer steps (stepped by optimizer_step)."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, total=total_steps, warmup=warmup, schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio)
    )
    return optimizer, scheduler


# ---------------------------------------------------------------- the optimizer step


def global_target_tokens(accelerator: Accelerator, batches: list[dict]) -> torch.Tensor:
    """Target tokens of the global batch: this rank's `batches` summed over all ranks. The model shifts
    labels by one inside its loss: a target token is a label at position >= 1."""
    local = sum(int((b["labels"][:, 1:] != qo.IGNORE_INDEX).sum()) for b in batches)
    return accelerator.reduce(torch.tensor(local, device=accelerator.device), reduction="sum")


def optimizer_step(accelerator: Accelerator, model, optimizer, scheduler, params, micro_batches: int,
                   loss_of: Callable[[int], torch.Tensor], max_grad_norm: float) -> dict:
    """One optimizer step over this rank's `micro_batches`; `loss_of(i)` is micro-batch i's loss, its share of the
    global per-token mean (the sum of its token losses / the global batch's target tokens).

    Returns the loss summed over all ranks, the gradient norm (None when DeepSpeed keeps it) and whether the
    step was finite; a non-finite one updates nothing.
    """
    loss_sum = torch.zeros((), device=accelerator.device)
    for i in range(micro_batches):
        with accelerator.accumulate(model):
            assert accelerator.sync_gradients == (i == micro_batches - 1), "accumulation window out of step"
            loss = loss_of(i)
            # DDP/ZeRO average gradients over ranks and Accelerate/DeepSpeed divide by grad_accum: undo both,
            # so the summed gradient is exactly that of the global per-token mean.
            accelerator.backward(loss * accelerator.num_processes * micro_batches)
            loss_sum += loss.detach()
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    loss = accelerator.reduce(loss_sum, reduction="sum").item()
    grad_norm = float(grad_norm) if grad_norm is not None else None
    # Loss and norm are global (reduced), so every rank takes the same decision.
    finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
    if finite:  # a non-finite step updates nothing; the caller stops or counts it (count_nonfinite)
        optimizer.step()
    scheduler.step()  # the schedule stays a function of the step, skipped or not
    optimizer.zero_grad()
    return {"loss": loss, "grad_norm": grad_norm, "finite": finite}


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


def finite_or_null(value):
    """JSON has no NaN or infinity: metrics.jsonl writes null for them."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: peak RSS (KiB on Linux)


# ---------------------------------------------------------------- checkpoints, resume, metrics


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


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name[len(CHECKPOINT_PREFIX):])


def checkpoint_state(checkpoint: Path) -> dict | None:
    """The state of a complete checkpoint (COMPLETE marker present, trainer_state.json parses), else None."""
    if not (checkpoint / COMPLETE).is_file():
        return None
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("step"), int) else None


def checkpoints(output_dir: Path, warn: Callable[[str], object] | None = None) -> list[Path]:
    """Complete checkpoints, oldest first; `warn` is told of each incomplete or corrupt one left out."""
    found = [p for p in (output_dir / "checkpoints").glob(CHECKPOINT_PREFIX + "*")
             if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    complete = []
    for path in sorted(found, key=step_of):
        if checkpoint_state(path) is not None:
            complete.append(path)
        elif warn is not None:
            warn(f"warning: {path}: incomplete or corrupt checkpoint (no {COMPLETE} marker, or {STATE_FILE} empty or "
                 f"unreadable: interrupted or a full disk), skipped; if an older version wrote it whole (before {COMPLETE} "
                 f"markers), `touch {path / COMPLETE}` to resume from it")
    return complete


def write_atomic(path: Path, text: str) -> None:
    """Write under a temporary name, then rename: a reader finds the whole file or none."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(accelerator: Accelerator, model, output_dir: Path, step: int, keep_last: int, state: dict) -> Path:
    path = output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
    with naming_full_disk(path, f"checkpoint {path.name}"):
        if accelerator.is_main_process:  # a checkpoint rewritten after a fall-back: incomplete until the end
            (path / COMPLETE).unlink(missing_ok=True)
        # DeepSpeed writes model + optimizer itself; the frozen base weights need not be in every checkpoint.
        accelerator.save_state(str(path), **({"exclude_frozen_parameters": True} if zero_stage(accelerator) else {}))
        save_adapter(accelerator, model, path / "adapter")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_atomic(path / STATE_FILE, json.dumps({"step": step, **state}))
            write_atomic(path / COMPLETE, "")
            complete = checkpoints(output_dir)
            # older ones, complete or not, go once `keep_last` complete ones are newer
            oldest_kept = step_of(complete[-keep_last]) if len(complete) >= keep_last else 0
            for old in (output_dir / "checkpoints").glob(CHECKPOINT_PREFIX + "*"):
                if old.name[len(CHECKPOINT_PREFIX):].isdigit() and step_of(old) < oldest_kept:
                    shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return path


def resume(accelerator: Accelerator, output_dir: Path, log: Callable[[str], object] | None = None) -> dict:
    """Load the newest complete checkpoint; returns its state: the optimizer step it was taken after (0: none), ...
    Incomplete or corrupt checkpoints are skipped, each named in a warning through `log`."""
    found = checkpoints(output_dir, warn=log)
    if not found:
        return {"step": 0}
    latest = found[-1]
    # Only the adapter is in the checkpoint, so the base weights are left as loaded.
    strict = {"load_module_strict": False} if zero_stage(accelerator) else {"strict": False}
    accelerator.load_state(str(latest), **strict)
    return checkpoint_state(latest)


def reset_metrics(path: Path, start: int) -> None:
    """Keep the JSONL lines of steps up to `start` (the resumed checkpoint): steps after it are redone."""
    keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= start] \
        if path.is_file() and start else []
    path.write_text("".join(line + "\n" for line in keep))


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
    state = resume(accelerator, out, log) if cfg.resume else {"step": 0}
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
            with naming_full_disk(metrics_path, "the metrics"), metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
    if step % cfg.save_every == 0 or step == end:
        save_checkpoint(accelerator, model, Path(cfg.output_dir), step, cfg.keep_last, state or {})


def save_final_adapter(accelerator: Accelerator, model, path: Path) -> None:
    """The run's adapter, written beside `path` and swapped in whole (the run owns its output folder)."""
    with naming_full_disk(path, "the final adapter"):
        if not accelerator.is_main_process:
            save_adapter(accelerator, model, path)  # under ZeRO-3 every rank takes part in the gather; rank 0 writes
            return
        with replacing(path, "train", made=lambda _: True, marker=False) as staging:
            save_adapter(accelerator, model, staging)


def finish(accelerator: Accelerator, model, out: Path, end: int, total_steps: int, metrics_path: Path, log) -> None:
    """The final adapter when the schedule is done; otherwise a note that a rerun resumes."""
    if end < total_steps:
        log(f"stopped after step {end} of {total_steps} (train.stop_after); run again to resume")
    else:
        save_final_adapter(accelerator, model, out / "adapter")
        log(f"done: adapter in {out / 'adapter'}, metrics in {metrics_path}")
    accelerator.end_training()
