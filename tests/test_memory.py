"""Memory: the plan's estimates against measured peaks, the chunked loss against the model's own, ZeRO-3 loading."""

from __future__ import annotations

import pytest
import torch

from core import qwen_omni as qo
from core.recipe import load_recipe
from core.tiny import REAL_SIZES, build_config, build_thinker
from train import memory
from train.loss import ChunkedLoss, chunked_cross_entropy, model_loss
from train.sft import prepare_for_training
from tests.test_train import recipe_file  # noqa: F401  (the training tests' recipe fixture)

# The estimate must be within this fraction of the measured peak (tensor bytes, not RSS).
TOLERANCE = 0.10


def plain_cpu_recipe(model_path: str, dtype: str, **train):
    """recipes/cogito.yaml's LoRA section, one process without DeepSpeed (how the CPU check trains)."""
    overrides = [f"model.path={model_path}", f"model.dtype={dtype}", "model.attn_implementation=null",
                 "train.mixed_precision='no'", "train.zero_stage=null", "train.batch_size=1", "train.grad_accum=1"]
    return load_recipe("recipes/cogito.yaml", overrides + [f"train.{k}={v}" for k, v in train.items()])


def text_batch(vocab: int, tokens: int, seed: int = 0) -> dict:
    """One text-only sample: the audio tower is frozen and saves nothing for backward."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if vocab > 2000 else 0, vocab - 400 if vocab > 2000 else vocab, (1, tokens), generator=generator)
    labels = ids.clone()
    labels[:, : tokens // 4] = qo.IGNORE_INDEX  # a prompt of a quarter of the sample
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def measured_peak_bytes(model, recipe, batch: dict, steps: int = 2) -> int:
    """Peak bytes of live tensors over `steps` LoRA steps (the second has AdamW state), from torch's
    CPU memory profiler: the tensors alive before (weights, buffers, the batch) + the running sum of
    every allocation and free after. Like torch.cuda.max_memory_allocated: no allocator caching."""
    from torch.profiler import ProfilerActivity, profile

    from train.loss import make_loss

    model, _ = prepare_for_training(model, recipe)
    model.train()
    loss_fn = make_loss(model, recipe.train.loss_chunk_tokens)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers(), *batch.values()]}
    before = sum(storages.values())
    num_items = (batch["labels"][:, 1:] != qo.IGNORE_INDEX).sum()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(steps):
            loss_fn(model, dict(batch), num_items).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return before + peak


def estimated_bytes(model, recipe, tokens: int) -> int:
    return sum(memory.estimate(model.config, recipe, stage=None, tokens=tokens, gpu=False).values())


def real_shaped_thinker(dtype: torch.dtype):
    """The real 30B-A3B thinker's shapes with 1 text, 1 audio and 1 vision layer (1.33B parameters).

    Allocated uninitialised and zeroed, not randomly initialised (a minute on this machine): which
    tensors exist, and their sizes, do not depend on the values."""
    config = build_config(sizes=REAL_SIZES, layers=1, audio_layers=1, vision_layers=1)
    with torch.device("meta"):
        model = qo.thinker_class()._from_config(config, dtype=dtype)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.zero_()
    return model


@pytest.mark.parametrize("train", [{}, {"gradient_checkpointing": "false"}, {"loss_chunk_tokens": 16}],
                         ids=["grad-ckpt", "no-grad-ckpt", "chunked-loss"])
def test_estimate_matches_the_measured_peak_of_the_tiny_thinker(tiny_checkpoint, train):
    recipe = plain_cpu_recipe(str(tiny_checkpoint), "float32", **train)
    model = qo.load_thinker(tiny_checkpoint, "float32")
    tokens = 512
    estimate = estimated_bytes(model, recipe, tokens)
    measured = measured_peak_bytes(model, recipe, text_batch(model.config.text_config.vocab_size, tokens))
    assert abs(estimate / measured - 1) < TOLERANCE, (estimate, measured)


@pytest.mark.slow
@pytest.mark.parametrize("train", [{}, {"loss_chunk_tokens": 64}], ids=["grad-ckpt", "chunked-loss"])
def test_estimate_matches_the_measured_peak_of_a_real_shaped_layer(train):
    recipe = plain_cpu_recipe("/nonexistent", "bfloat16", **train)
    model = real_shaped_thinker(torch.bfloat16)
    tokens = 256
    estimate = estimated_bytes(model, recipe, tokens)
    measured = measured_peak_bytes(model, recipe, text_batch(model.config.text_config.vocab_size, tokens))
    assert measured > 2.49 * 2**30  # 1.33B bf16 weights (2.49 GiB) and more: the real shapes were built
    assert abs(estimate / measured - 1) < TOLERANCE, (estimate, measured)


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_chunked_loss_equals_the_model_loss_and_gradients(tiny_checkpoint, chunk):
    # lm_head has LoRA too: the chunks call the adapted head, and its adapter gets the same gradient
    recipe = plain_cpu_recipe(str(tiny_checkpoint), "float32", gradient_checkpointing="false")
    recipe.lora.targets = [*recipe.lora.targets, "lm_head"]
    recipe.lora.dropout = 0.0
    model, _ = prepare_for_training(qo.load_thinker(tiny_checkpoint, "float32"), recipe)
    batch = text_batch(model.config.text_config.vocab_size, 48, seed=1)
    batch["labels"][0, 30:33] = qo.IGNORE_INDEX  # a gap inside the target, like padding between samples
    num_items = torch.tensor(123)  # the global batch's target tokens: more than this micro-batch's
    results = []
    for loss_fn in (model_loss, ChunkedLoss(model, chunk)):
        model.zero_grad()
        loss = loss_fn(model, dict(batch), num_items)
        loss.backward()
        results.append((loss.detach(), lora_grads(model)))
    (loss, grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == chunked_grads.keys() and any("lm_head" in name for name in grads)
    for name in grads:
        assert grads[name].abs().sum() > 0 or "lora_B" not in name
        torch.testing.assert_close(chunked_grads[name], grads[name], rtol=1e-5, atol=1e-8, msg=name)


def test_chunked_cross_entropy_without_targets_still_backpropagates():
    hidden = torch.randn(1, 5, 4, requires_grad=True)
    loss = chunked_cross_entropy(torch.nn.Linear(4, 9), hidden, torch.full((1, 5), qo.IGNORE_INDEX), 2, torch.tensor(3))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad is not None and not hidden.grad.any()


@pytest.mark.slow
def test_two_processes_zero3_take_the_single_process_steps(recipe_file, tmp_path):
    """Two gloo ranks under ZeRO-3, each holding half of every parameter from loading on, take the
    same steps as one process with the whole batch."""
    import json
    import os
    import re
    import subprocess
    import sys

    import numpy as np

    from tests.test_train import REPO, adapter_weights, metrics, run_sft

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes/accelerate/cpu_zero3_2proc.yaml"), str(REPO / "train/sft.py"), str(recipe_file),
           f"train.output_dir={two}", "train.batch_size=2", "train.zero_stage=3"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    one = run_sft(recipe_file, f"train.output_dir={tmp_path}/one", "train.batch_size=4")
    # the logged parameter count is the full model's (+ LoRA) although each rank holds half of it
    base = sum(p.numel() for p in qo.load_thinker(load_recipe(recipe_file).model.path).parameters())
    trainable, total = (int(n.replace(",", "")) for n in re.search(
        r"([\d,]+) trainable of ([\d,]+) parameters", done.stdout + done.stderr).groups())
    assert 0 < trainable < base and total == base + trainable
    assert [m["target_tokens"] for m in metrics(one)] == [m["target_tokens"] for m in metrics(two)]
    np.testing.assert_allclose([m["loss"] for m in metrics(one)], [m["loss"] for m in metrics(two)], rtol=1e-4)
    a, b = adapter_weights(one / "adapter"), adapter_weights(two / "adapter")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)
    assert json.loads((two / "checkpoints" / "step-3" / "trainer_state.json").read_text())["step"] == 3


def test_a_launch_with_another_zero_stage_than_the_recipe_is_refused(recipe_file):
    from tests.test_train import run_sft

    with pytest.raises(ValueError, match="train.zero_stage=3 .* runs ZeRO stage 0"):
        run_sft(recipe_file, "train.zero_stage=3")


def test_zero3_loading_needs_transformers_to_see_the_zero3_config(tiny_checkpoint):
    with pytest.raises(RuntimeError, match="does not see a ZeRO-3 DeepSpeed config"):
        qo.load_thinker(tiny_checkpoint, zero3=True)


def test_plan_of_the_cogito_recipe_on_8_x_80_gb():
    """The real thinker's shapes: ZeRO-2 holds all bf16 weights on each GPU and does not fit at 8,192
    tokens; ZeRO-3 (what recipes/cogito.yaml ships) fits with headroom."""
    recipe = load_recipe("recipes/cogito.yaml")
    config = memory.thinker_config("/nonexistent")  # no download: the real shapes
    lora = 48 * 16 * (2 * (2048 + 4096) + 2 * (2048 + 512))  # r16 on q/k/v/o of 48 layers
    zero2, zero3 = (memory.estimate(config, recipe, stage, 8, lora_params=lora) for stage in (2, 3))
    assert zero2["weights"] == 31_719_205_488 * 2 and zero3["weights"] == zero2["weights"] // 8
    assert zero2["logits (fp32) + grads, or a layer's recompute"] == 12 * 152_064 * 8192
    assert sum(zero2.values()) > 80 * memory.GIB > 40 * memory.GIB > sum(zero3.values())
    assert recipe.train.zero_stage == 3 and recipe.train.gradient_checkpointing
    chunked = recipe.model_copy(deep=True)
    chunked.train.loss_chunk_tokens = 1024
    assert sum(memory.estimate(config, chunked, 2, 8, lora_params=lora).values()) < 70 * memory.GIB


def test_memory_command_prints_the_table(tiny_checkpoint, capsys):
    assert memory.main(["recipes/tiny.yaml", "--gpus", "2", "--gpu-gib", "8", f"model.path={tiny_checkpoint}"]) == 0
    out = capsys.readouterr().out
    assert "| **total** |" in out and "ZeRO-3, grad ckpt off" in out and str(tiny_checkpoint) in out
    assert memory.main(["recipes/tiny.yaml", "--gpu-gib", "0.001", f"model.path={tiny_checkpoint}"]) == 1  # nothing fits
