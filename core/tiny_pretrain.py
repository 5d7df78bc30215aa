"""A short pre-training that makes the tiny base hear, as the real base model does before any SFT.

The real Qwen3-Omni thinker was pre-trained on audio: its language model already reads the audio
tokens and answers questions about what it hears, and fine-tuning teaches it a task's reasoning
and format. A randomly initialised tiny thinker cannot learn that under LoRA alone (frozen random
audio features and embeddings: ~50 % held-out accuracy, barely above chance), while every weight
trained together learns it in a minute. So `make tiny` trains every weight of the tiny base on clips
of its own (the synthetic `pretrain` split), each twice: described ("Describe the audio." -> "A
higher tone, then a lower tone.") and its question answered in plain words (-> 'I hear a higher
tone, then a lower tone, so the answer is "the first tone".'), with no thinking block. With captions
alone, 13 runs of the demo's LoRA reached 72-93 % held-out: the reasoning named what was heard, then
often concluded another choice than the one it implies. The demo's fine-tuning then teaches the thinking format, with LoRA, as
on the real model.

Under `accelerate launch` (`make tiny`: 2 CPU ranks, recipes/accelerate/cpu_ddp_2proc.yaml) each rank
computes its half of every batch and DDP averages the gradients, weighted so that the loss is the
global batch's per-token mean, as in one process.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from core import qwen_omni as qo
from core.items import DataError, load_items

CAPTION_PROMPT = "Describe the audio."
STEPS = 300  # base captions 97 % of held-out clips right (150 steps: 62 %, near chance on three tasks)
BATCH_SIZE = 16
LR = 3e-3
WARMUP_STEPS = 10


def caption_reply(caption: str) -> str:
    """The assistant's reply to CAPTION_PROMPT: the caption as a sentence, then end of turn."""
    return caption[:1].upper() + caption[1:] + "." + qo.IM_END


def pretrain_examples(path: str | Path, processor: qo.OmniProcessor) -> list[dict]:
    """Two (prompt, reply, clip features) per record of a JSONL whose records carry `caption`: the
    clip described, and the record's question answered in plain words (its reference reasoning, no
    thinking block), as a base model answers before any SFT."""
    caption_prompt = qo.render_chat(processor.tokenizer, CAPTION_PROMPT)
    examples = []
    for item in load_items(path):
        caption = item.meta.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(f"{item.where} (id={item.id}): caption: missing (the pre-training needs one per clip)")
        if not item.thinking:
            raise DataError(f"{item.where} (id={item.id}): thinking: missing (the pre-training answers the question with it)")
        features = processor.clip_features(item.load_audio())
        question_prompt = qo.render_prompt(processor.tokenizer, item.question, item.choices)
        examples += [{"prompt": caption_prompt, "target": caption_reply(caption), "features": features},
                     {"prompt": question_prompt, "target": item.thinking + qo.IM_END, "features": features}]
    return examples


def pretrain_to_hear(
    model, processor: qo.OmniProcessor, path: str | Path, steps: int = STEPS, batch_size: int = BATCH_SIZE,
    lr: float = LR, seed: int = 0, log: Callable[[str], None] = print,
) -> float:
    """Train every weight of `model` but the vision tower's in place on `pretrain_examples(path)`; returns the
    last step's loss.

    `batch_size` is the global batch: with several ranks (an Accelerator's processes) each takes its
    slice of it.
    """
    from accelerate import Accelerator

    examples = pretrain_examples(path, processor)
    if len(examples) < batch_size:
        raise DataError(f"{path}: {len(examples)} captioned clips, fewer than one batch of {batch_size}")
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    if batch_size % world:
        raise ValueError(f"pre-training batch of {batch_size} does not split over {world} ranks")
    # the clips reach every weight but the vision tower's (no image or video goes in); frozen, DDP
    # waits for no gradient from it
    model.visual.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # the scheduler stays outside prepare: Accelerate would step it once per rank
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    # linear warmup, then cosine decay to 0
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / WARMUP_STEPS) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model.train()
    start = time.perf_counter()
    share = batch_size // world
    for step in range(steps):
        picked = rng.choice(len(examples), batch_size, replace=False)  # the same on every rank
        rows = [examples[i] for i in picked[rank * share:(rank + 1) * share]]
        batch = processor([r["prompt"] for r in rows], features=[r["features"] for r in rows],
                          targets=[r["target"] for r in rows], padding_side="right")
        # the model's loss is the mean over this rank's target tokens; weighted by this rank's share of
        # the global batch's tokens (times world: DDP averages), the gradient is the global token mean's
        local = (batch["labels"][:, 1:] != qo.IGNORE_INDEX).sum()
        tokens = accelerator.reduce(local.clone(), reduction="sum")
        loss = ddp_model(**batch, use_cache=False).loss * (local * world / tokens)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 25 == 0 or step == steps - 1:
            loss = accelerator.reduce(loss.detach(), reduction="mean").item()  # the global batch's per-token loss
            seconds = time.perf_counter() - start
            if accelerator.is_main_process:
                log(f"pretrain: step {step + 1}/{steps} loss {loss:.4f} ({(step + 1) * batch_size / seconds:.1f} clips/s"
                    f" on {world} rank(s))")
    model.eval()
    return loss
