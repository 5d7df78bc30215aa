"""Memory: the plan's estimates against measured peaks, the chunked loss against the model's own, ZeRO-3 loading."""

from __future__ import annotations

import pytest
import torch

from core import qwen_omni as qo
from core.recipe import load_recipe
from core.tiny import REAL_SIZES, build_config
from train import memory
from train.loss import ChunkedLoss, chunked_cross_entropy, model_loss
from train.runtime import prepare_for_training
from train.zero3 import checkpoint_tensors, fill_zero3_partition, load_thinker_zero3, thinker_weight_plan

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
        # float32 rounding scales with the terms summed, not the result: the margin follows the tensor's scale
        scale = float(grads[name].abs().max())
        torch.testing.assert_close(chunked_grads[name], grads[name], rtol=1e-5, atol=2e-6 * scale + 1e-12, msg=name)


def test_chunked_cross_entropy_without_targets_still_backpropagates():
    hidden = torch.randn(1, 5, 4, requires_grad=True)
    loss = chunked_cross_entropy(torch.nn.Linear(4, 9), hidden, torch.full((1, 5), qo.IGNORE_INDEX), 2, torch.tensor(3))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad is not None and not hidden.grad.any()


@pytest.mark.slow
def test_two_processes_zero3_take_the_single_process_steps(recipe_file, tmp_path):
    """Two gloo ranks under ZeRO-3, each holding half of every parameter from loading on, take the
    gradients of one process with the whole batch."""
    import json
    import re

    import numpy as np

    from tests.sft_grads import captured_gradients
    from tests.test_train import REPO, SAME_WEIGHTS, assert_same_gradients, launch_ranks, metrics, run_sft

    two = tmp_path / "two"
    two.mkdir()
    done = launch_ranks("cpu_zero3_2proc.yaml", str(REPO / "tests/sft_grads.py"), str(two), str(recipe_file),
                        f"train.output_dir={two}", "train.batch_size=2", "train.zero_stage=3", *SAME_WEIGHTS)
    with captured_gradients() as one_grads:
        one = run_sft(recipe_file, f"train.output_dir={tmp_path}/one", "train.batch_size=4", *SAME_WEIGHTS)
    # the logged parameter count is the full model's (+ LoRA) although each rank holds half of it
    base = sum(p.numel() for p in qo.load_thinker(load_recipe(recipe_file).model.path).parameters())
    trainable, total = (int(n.replace(",", "")) for n in re.search(
        r"([\d,]+) trainable of ([\d,]+) parameters", done.stdout + done.stderr).groups())
    assert 0 < trainable < base and total == base + trainable
    ranks = [torch.load(two / f"grads-rank{r}.pt") for r in (0, 1)]
    assert_same_gradients(one_grads, ranks[0])
    assert_same_gradients(ranks[0], ranks[1])  # gathered from both halves on each rank
    assert [m["target_tokens"] for m in metrics(one)] == [m["target_tokens"] for m in metrics(two)]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in metrics(one)], [m[key] for m in metrics(two)], rtol=1e-5, err_msg=key)
    assert json.loads((two / "checkpoints" / "step-3" / "trainer_state.json").read_text())["step"] == 3


def test_a_launch_with_another_zero_stage_than_the_recipe_is_refused(recipe_file):
    from tests.test_train import run_sft

    with pytest.raises(ValueError, match="train.zero_stage=3 .* runs ZeRO stage 0"):
        run_sft(recipe_file, "train.zero_stage=3")


def test_zero3_loading_needs_transformers_to_see_the_zero3_config(tiny_checkpoint):
    with pytest.raises(RuntimeError, match="does not see a ZeRO-3 DeepSpeed config"):
        load_thinker_zero3(tiny_checkpoint)


def test_weight_plan_fuses_the_experts_as_transformers_does(tiny_checkpoint):
    """The plan, followed on one process, rebuilds every parameter of the stock load bit for bit
    (the kit's layout is the real one: thinker.-prefixed, per-expert tensors, 4 shards)."""
    from safetensors import safe_open

    stock = qo.load_thinker(tiny_checkpoint, "float32")
    tensors = checkpoint_tensors(tiny_checkpoint)
    assert len({path for path, _ in tensors.values()}) == 4
    plan = thinker_weight_plan({k: shape for k, (_, shape) in tensors.items()},
                               {n: tuple(p.shape) for n, p in stock.named_parameters()})
    experts = stock.config.text_config.num_experts
    assert len(plan["model.layers.0.mlp.experts.gate_up_proj"]) == 2 * experts
    assert len(plan["model.layers.0.mlp.experts.down_proj"]) == experts
    for name, param in stock.named_parameters():
        rebuilt = torch.full_like(param, float("nan"))
        for key, index in plan[name]:
            with safe_open(str(tensors[key][0]), "pt") as f:
                rebuilt[index] = f.get_tensor(key)
        assert torch.equal(rebuilt, param), name


PLAN_PARAMS = {"norm.weight": (3,), "l.mlp.experts.gate_up_proj": (2, 8, 3), "l.mlp.experts.down_proj": (2, 3, 4)}


def plan_tensors() -> dict[str, tuple]:
    """A composite checkpoint for PLAN_PARAMS: per-expert thinker tensors and a talker tensor."""
    shapes = {"thinker.norm.weight": (3,), "talker.head.weight": (5, 5)}
    for e in range(2):
        shapes |= {f"thinker.l.mlp.experts.{e}.gate_proj.weight": (4, 3), f"thinker.l.mlp.experts.{e}.up_proj.weight": (4, 3),
                   f"thinker.l.mlp.experts.{e}.down_proj.weight": (3, 4)}
    return shapes


def test_weight_plan_places_each_expert_and_skips_the_other_sub_models():
    plan = thinker_weight_plan(plan_tensors(), PLAN_PARAMS)
    assert plan["norm.weight"] == [("thinker.norm.weight", ())]
    assert sorted(plan["l.mlp.experts.gate_up_proj"], key=str) == [
        ("thinker.l.mlp.experts.0.gate_proj.weight", (0, slice(0, 4))), ("thinker.l.mlp.experts.0.up_proj.weight", (0, slice(4, 8))),
        ("thinker.l.mlp.experts.1.gate_proj.weight", (1, slice(0, 4))), ("thinker.l.mlp.experts.1.up_proj.weight", (1, slice(4, 8)))]
    assert sorted(plan["l.mlp.experts.down_proj"]) == [("thinker.l.mlp.experts.0.down_proj.weight", (0, slice(None))),
                                                       ("thinker.l.mlp.experts.1.down_proj.weight", (1, slice(None)))]
    assert "talker.head.weight" not in str(plan)
    # a thinker-only checkpoint (no prefix) and an already fused expert tensor load too
    fused = {"norm.weight": (3,), "l.mlp.experts.gate_up_proj": (2, 8, 3), "l.mlp.experts.down_proj": (2, 3, 4)}
    assert thinker_weight_plan(fused, PLAN_PARAMS)["l.mlp.experts.gate_up_proj"] == [("l.mlp.experts.gate_up_proj", ())]


@pytest.mark.parametrize("change, message", [
    ({"thinker.lm_head.weight": (5, 3)}, r"thinker\.lm_head\.weight fits no parameter"),
    ({"thinker.norm.weight": None}, r"parameter norm\.weight: no checkpoint tensor"),
    ({"thinker.l.mlp.experts.1.up_proj.weight": None}, r"gate_up_proj: no checkpoint tensor for expert 1\.up_proj"),
    ({"thinker.l.mlp.experts.0.down_proj.weight": (4, 3)},
     r"down_proj\.weight has shape \(4, 3\), l\.mlp\.experts\.down_proj\[0, :\] \(3, 4\)"),
    ({"thinker.l.mlp.experts.2.gate_proj.weight": (4, 3)},
     r"experts\.2\.gate_proj\.weight: l\.mlp\.experts\.gate_up_proj has 2 experts"),
    ({"thinker.l.mlp.experts.down_proj": (2, 3, 4)}, r"l\.mlp\.experts\.down_proj: filled twice"),
], ids=["unknown-tensor", "missing-parameter", "missing-expert", "wrong-shape", "expert-out-of-range", "fused-and-per-expert"])
def test_weight_plan_names_what_does_not_match(change, message):
    shapes = {k: v for k, v in {**plan_tensors(), **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        thinker_weight_plan(shapes, PLAN_PARAMS)


def test_weight_plan_leaves_a_tied_parameter_to_the_tie():
    shapes = {k: v for k, v in plan_tensors().items() if k != "thinker.norm.weight"}
    assert "norm.weight" not in thinker_weight_plan(shapes, PLAN_PARAMS, tied=["norm.weight"])


def renamed_copy(checkpoint, out, old: str, new: str):
    """`checkpoint` with tensor `old` renamed `new` in its shard and index."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoint, out)
    index = json.loads((out / qo.WEIGHT_INDEX).read_text())
    shard = out / index["weight_map"].pop(old)
    tensors = load_file(shard)
    tensors[new] = tensors.pop(old)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"][new] = shard.name
    (out / qo.WEIGHT_INDEX).write_text(json.dumps(index))
    return out


def test_each_rank_fills_its_own_zero3_partition_from_the_checkpoint(tmp_path, monkeypatch):
    """DeepSpeed's layout (the flattened parameter padded to a multiple of the ranks, cut in equal
    pieces): 4 ranks of a fused expert parameter of 210 elements, cut mid-row and mid-expert, each
    filled from per-expert tensors, put back together give the fused tensor, padding zeroed."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from safetensors import safe_open
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {f"e{e}.{p}": torch.randn(5, 7, generator=gen) for e in range(3) for p in ("gate", "up")}
    save_file(tensors, tmp_path / "w.safetensors")
    fused = torch.stack([torch.cat([tensors[f"e{e}.gate"], tensors[f"e{e}.up"]]) for e in range(3)])  # (3, 10, 7)
    plan = [(f"e{e}.{p}", (e, slice(0, 5) if p == "gate" else slice(5, 10))) for e in range(3) for p in ("gate", "up")]
    parts = []
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        for rank in range(4):
            monkeypatch.setattr(dist, "get_rank", lambda group=None, rank=rank: rank)
            partition = torch.full((53,), float("nan"))  # ceil(210 / 4): the last one holds 2 padding elements
            partition.ds_numel = 53
            param = SimpleNamespace(ds_shape=fused.shape, ds_numel=210, ds_process_group=None, ds_tensor=partition)
            fill_zero3_partition(param, [(f.get_slice(key), index) for key, index in plan])
            parts.append(partition)
    together = torch.cat(parts)
    assert torch.equal(together[:210], fused.reshape(-1)) and torch.equal(together[210:], torch.zeros(2))


@pytest.mark.slow
def test_two_processes_zero3_stream_the_stock_weights(tiny_checkpoint, tmp_path, one_torch_thread):
    """Two gloo ranks load the kit under ZeRO-3 (bf16, as the recipes train), each filling only its own half
    from the checkpoint; gathered, every parameter and buffer equals transformers' plain load bit for bit
    and one forward with audio gives the same logits. A checkpoint that does not match fails on both ranks."""
    import math

    from tests.test_train import REPO, launch_ranks
    from tests.zero3_load_worker import forward_batch

    broken = renamed_copy(tiny_checkpoint, tmp_path / "broken", "thinker.model.layers.0.mlp.experts.1.up_proj.weight",
                          "thinker.model.layers.0.mlp.experts.7.up_proj.weight")
    launch_ranks("cpu_zero3_2proc.yaml", str(REPO / "tests/zero3_load_worker.py"), str(tiny_checkpoint), str(broken),
                 str(tmp_path))
    stock = qo.load_thinker(tiny_checkpoint, "bfloat16")
    with torch.no_grad():
        logits = stock(**forward_batch(str(tiny_checkpoint))).logits
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["held"] == sum(math.ceil(p.numel() / 2) for p in stock.parameters())
        assert got["params"].keys() == dict(stock.named_parameters()).keys()
        for name, param in stock.named_parameters():
            assert got["params"][name].dtype == param.dtype == torch.bfloat16 and torch.equal(got["params"][name], param), name
        assert got["buffers"].keys() == dict(stock.named_buffers()).keys()
        for name, buffer in stock.named_buffers():  # the rotary frequencies stay float32, as in the plain load
            assert got["buffers"][name].dtype == buffer.dtype == torch.float32 and torch.equal(got["buffers"][name], buffer), name
        assert torch.equal(got["logits"], logits)
        assert not got["training"] and got["config_dtype"] == "torch.bfloat16"
        assert got["generation"] == stock.generation_config.to_dict()
        assert "experts.7.up_proj.weight: model.layers.0.mlp.experts.gate_up_proj has 4 experts" in got["broken"]
        assert "gate_up_proj: no checkpoint tensor for expert 1.up_proj" in got["broken"]


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


def test_grpo_plan_of_the_real_recipe_counts_rollouts_and_the_vllm_share(capsys):
    """GRPO's plan is not SFT's: micro-batches of rollout sequences (the 30 s clip's 390 audio tokens + 256
    of text + 4,096 new tokens), the rollout engine's memory; the shipped recipe (ZeRO-3, vLLM in 30% of
    each GPU, tensor parallel over 4) fits on 8 x 80 GiB, ZeRO-2 does not."""
    recipe = load_recipe("recipes/grpo_qwen3_omni.yaml")
    config = memory.thinker_config("/nonexistent")  # the real shapes
    lora = 48 * 16 * (2 * (2048 + 4096) + 2 * (2048 + 512))
    assert memory.grpo_sequence_tokens(recipe) == 390 + 256 + 4096
    gpu = 80 * memory.GIB
    grpo3 = memory.grpo_estimate(config, recipe, 3, 8, gpu, lora)
    sft3 = memory.estimate(config, recipe, 3, 8, lora_params=lora)
    assert grpo3["activations saved for backward"] == sft3["activations saved for backward"] // (2 * 4096) * (2 * 4742)
    assert grpo3["vLLM share (grpo.vllm.gpu_memory_utilization)"] == int(0.3 * gpu)
    assert grpo3["log-probs kept (old, reference, rollout engine's; fp32)"] == 8 * 4096 * 4  # vLLM's only
    need = memory.vllm_need(config, recipe, 8)
    kv_per_token = 2 * 48 * 1 * 128 * 2  # 4 KV heads over 4 GPUs: one each, bf16
    assert need == {"weights": 31_719_205_488 * 2 // 4, "KV cache": 4 * 8 * 4742 * kv_per_token,
                    "overhead": memory.VLLM_OVERHEAD}
    grpo2 = memory.grpo_estimate(config, recipe, 2, 8, gpu, lora)
    assert sum(need.values()) < 0.3 * gpu and sum(grpo3.values()) < gpu < sum(grpo2.values())
    hf = recipe.model_copy(deep=True)
    hf.grpo.rollout_engine = "hf"
    rows = memory.grpo_estimate(config, hf, 3, 8, gpu, lora)
    assert rows["rollout KV cache (hf generate)"] == 8 * 4742 * 2 * 48 * 4 * 128 * 2
    assert "vLLM share (grpo.vllm.gpu_memory_utilization)" not in rows
    assert memory.main(["recipes/grpo_qwen3_omni.yaml"]) == 0
    out = capsys.readouterr().out
    assert "memory plan (GRPO)" in out and "needs 20.2" in out and "recipe: train.zero_stage=3 -> fits" in out
    assert memory.main(["recipes/grpo_qwen3_omni.yaml", "grpo.vllm.tensor_parallel_size=1"]) == 1  # 59 GiB of weights
    assert "does NOT hold every rollout at once" in capsys.readouterr().out
