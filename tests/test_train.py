"""LoRA SFT on the tiny kit: loss, masking, resume, two ranks, merge, adapter placement."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from core import qwen_omni as qo
from core.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_sft(recipe_file: Path, *overrides: str) -> Path:
    from accelerate.state import AcceleratorState

    from train.sft import main

    AcceleratorState._reset_state(True)  # each in-process run gets a fresh Accelerator
    assert main([str(recipe_file), *overrides]) == 0
    return Path(load_recipe(recipe_file, list(overrides)).train.output_dir)


def launch_ranks(config: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file recipes/accelerate/CONFIG ARGS` from the repo root, one torch thread
    per rank; asserts it succeeded and returns it (stdout and stderr captured)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(REPO / "recipes" / "accelerate" / config), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_short_run_lowers_the_loss(recipe_file):
    run = run_sft(recipe_file, "train.max_steps=12", "train.save_every=6", "train.keep_last=1")
    losses = [m["loss"] for m in metrics(run)]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert losses[0] > 5.5  # a random model over a ~400-token vocabulary
    assert np.mean(losses[-3:]) < losses[0] - 0.8
    record = metrics(run)[-1]
    assert record["target_tokens"] > 0 and record["target_tokens_per_s"] > 0 and record["grad_norm"] > 0
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-12"]  # keep_last=1 pruned step-6
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["max_steps"] == 12


def test_labels_mask_prompt_and_padding(recipe_file, processor):
    from train.data import SFTCollator, SFTDataset, build_examples

    recipe = load_recipe(recipe_file)
    examples = build_examples(recipe.data, processor, "baseline", seed=0, log=lambda *_: None)
    rows = [examples[i] for i in (0, 5, 9)]
    batch = SFTCollator(processor)([SFTDataset(rows, 30.0)[i] for i in range(3)])
    assert batch["ids"] == [e.item.id for e in rows]
    for row, example in enumerate(rows):
        frames = int(batch["feature_attention_mask"][row].sum())
        prompt_len = len(processor.tokenizer(processor.expand_audio(example.prompt, frames), add_special_tokens=False)["input_ids"])
        length = int(batch["attention_mask"][row].sum())
        assert example.length == length  # estimated from the audio header, without decoding: exact
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        assert (labels[:prompt_len] == qo.IGNORE_INDEX).all()  # prompt
        assert (labels[length:] == qo.IGNORE_INDEX).all()  # right padding
        assert torch.equal(labels[prompt_len:length], ids[prompt_len:length])  # the whole target, nothing else
        target = processor.tokenizer.decode(labels[prompt_len:length])
        assert target.startswith("<think>\n") and "</think>\n\n" in target
        assert target.endswith(example.item.answer + "<|im_end|>")
    assert (batch["attention_mask"] == 0).any()  # the rows differ in length, so padding was checked


def test_long_samples_are_dropped_and_datasets_mixed(recipe_file, processor, synthetic_dir, tmp_path):
    from train.data import build_examples

    lines = []
    # the 24 samples are 94-110 tokens long (short reference reasoning): 104 drops some, keeps some
    recipe = load_recipe(recipe_file, ["data.max_length=104"])
    kept = build_examples(recipe.data, processor, "baseline", seed=0, log=lines.append)
    assert all(e.length <= 104 for e in kept) and 0 < len(kept) < 24
    assert f"{24 - len(kept)} dropped" in lines[0]

    train, small = synthetic_dir / "train.jsonl", tmp_path / "small.jsonl"
    small.write_text("".join(train.read_text().splitlines(keepends=True)[:4]))
    mixed = load_recipe(recipe_file, [
        f"data.train=[{{path: {train}, weight: 3}}, {{path: {small}, audio_root: {synthetic_dir}, weight: 1}}]"
    ])
    examples = build_examples(mixed.data, processor, "baseline", seed=0, log=lambda *_: None)
    # 3:1 over the 28 samples: 21 of the 24, and the 4 small ones 7 times (each once, three of them twice)
    assert len(examples) == 28 and sum(e.source == str(small) for e in examples) == 7
    assert len({e.item.id for e in examples if e.source == str(small)}) == 4


def test_batches_split_ranks_and_group_lengths():
    from train.data import epoch_batches

    lengths = list(np.random.default_rng(0).integers(50, 500, size=70))
    ranks = [epoch_batches(lengths, 4, 2, 2, rank, seed=1, epoch=0) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 70 // 16 * 2  # whole optimizer steps only
    ids = [i for r in ranks for b in r for i in b]
    assert len(ids) == len(set(ids)) == 64
    assert epoch_batches(lengths, 4, 2, 2, 0, seed=1, epoch=1) != ranks[0]  # reshuffled per epoch
    grouped = epoch_batches(lengths, 4, 1, 1, 0, seed=1, epoch=0)
    plain = epoch_batches(lengths, 4, 1, 1, 0, seed=1, epoch=0, group_by_length=False)
    padding = lambda batches: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert padding(grouped) < padding(plain) / 3


# The gradient tests train at lr 1e-12: a step moves a weight by at most that, below float32's resolution
# of the LoRA A weights and far below any gradient's effect, so every step's gradient is taken at the same
# weights in both runs (with the B weights still ~0, the A gradients are too: the B ones carry the check).
SAME_WEIGHTS = ("train.lr=1e-12", "train.max_grad_norm=1e9")  # and no clipping: the raw gradients


def assert_same_gradients(expected: list[dict], actual: list[dict]) -> None:
    """Per optimizer step, every adapter gradient equal up to float32 summation order. Its rounding is
    relative to the size of the summed terms, not of the result (a near-zero element sums large ones), so
    the margin is 1e-5 of the step's largest gradient element (~100 float32 steps of it; bitwise equal on
    the Intel machine they were written on) plus 1e-4 relative. A wrong scaling by grad_accum or the
    number of ranks is off by 50-100 % on nearly every element."""
    assert len(actual) == len(expected) > 0
    for step, (want, got) in enumerate(zip(expected, actual), 1):
        assert got.keys() == want.keys()
        scale = max(float(g.abs().max()) for g in want.values())
        assert scale > 0
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * scale,
                                       msg=lambda m, step=step, name=name: f"step {step}, {name}: {m}")


def test_accumulation_matches_one_big_batch(recipe_file, tmp_path):
    """Two micro-batches of 2 accumulate the gradient of one batch of 4: per-token loss over the window."""
    from tests.sft_grads import captured_gradients

    with captured_gradients() as one_grads:
        one = run_sft(recipe_file, f"train.output_dir={tmp_path}/one", "train.batch_size=4", "train.grad_accum=1", *SAME_WEIGHTS)
    with captured_gradients() as accum_grads:
        accum = run_sft(recipe_file, f"train.output_dir={tmp_path}/acc", "train.batch_size=2", "train.grad_accum=2", *SAME_WEIGHTS)
    assert_same_gradients(one_grads, accum_grads)
    assert [m["target_tokens"] for m in metrics(one)] == [m["target_tokens"] for m in metrics(accum)]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in metrics(one)], [m[key] for m in metrics(accum)], rtol=1e-5, err_msg=key)


def test_resume_gives_the_uninterrupted_run(recipe_file, tmp_path):
    # 24 samples / (2 x 2) = 6 steps an epoch: the stop at 4 is mid-epoch, the run crosses an epoch;
    # dropout > 0 checks that the RNG state is restored too.
    common = ["train.batch_size=2", "train.grad_accum=2", "train.max_steps=8", "train.save_every=2",
              "train.warmup_ratio=0.2", "lora.dropout=0.1"]
    full = run_sft(recipe_file, f"train.output_dir={tmp_path}/full", *common)
    resumed = tmp_path / "resumed"
    run_sft(recipe_file, f"train.output_dir={resumed}", *common, "train.stop_after=4")
    assert not (resumed / "adapter").exists() and [m["step"] for m in metrics(resumed)] == [1, 2, 3, 4]
    run_sft(recipe_file, f"train.output_dir={resumed}", *common)
    assert [m["step"] for m in metrics(resumed)] == list(range(1, 9))
    np.testing.assert_allclose([m["loss"] for m in metrics(resumed)], [m["loss"] for m in metrics(full)], rtol=1e-6)
    assert [m["lr"] for m in metrics(resumed)] == [m["lr"] for m in metrics(full)]
    sessions = [json.loads(line) for line in (resumed / "provenance.jsonl").read_text().splitlines()]
    assert [s["session"] for s in sessions] == [0, 1] and all(len(s["git"]["commit"]) == 40 for s in sessions)
    a, b = adapter_weights(full / "adapter"), adapter_weights(resumed / "adapter")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_two_processes_zero2_split_the_data(recipe_file, tmp_path):
    """Two gloo ranks under DeepSpeed ZeRO-2 train on disjoint halves of each global batch and take
    the gradients of one process with the whole batch (per-token loss over ranks)."""
    from tests.sft_grads import captured_gradients

    two = tmp_path / "two"
    two.mkdir()
    launch_ranks("cpu_zero2_2proc.yaml", str(REPO / "tests/sft_grads.py"), str(two), str(recipe_file),
                 f"train.output_dir={two}", "train.batch_size=2", "train.save_every=2", *SAME_WEIGHTS)
    seen = [[json.loads(line) for line in (two / "seen" / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    ids = [{i for step in rank for i in step["ids"]} for rank in seen]
    assert len(ids[0]) == len(ids[1]) == 3 * 2 and not ids[0] & ids[1]
    assert (two / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-2", "step-3"]

    with captured_gradients() as one_grads:
        one = run_sft(recipe_file, f"train.output_dir={tmp_path}/one", "train.batch_size=4", *SAME_WEIGHTS)
    ranks = [torch.load(two / f"grads-rank{r}.pt") for r in (0, 1)]
    assert_same_gradients(one_grads, ranks[0])
    assert_same_gradients(ranks[0], ranks[1])  # each rank sees the whole gradient
    assert [m["target_tokens"] for m in metrics(one)] == [m["target_tokens"] for m in metrics(two)]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in metrics(one)], [m[key] for m in metrics(two)], rtol=1e-5, err_msg=key)


def test_merged_checkpoint_gives_the_adapter_logits(tiny_checkpoint, processor, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from train.merge import main as merge_main

    model = qo.load_thinker(tiny_checkpoint, "float32")
    config = LoraConfig(  # random B as well as A: a fresh adapter would be the identity
        r=4, lora_alpha=8, init_lora_weights=False,
        target_modules=qo.lora_target_names(model, qo.ATTENTION_PROJECTIONS),
        target_parameters=qo.expert_parameter_names(model),
    )
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    assert merge_main(["--base", str(tiny_checkpoint), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0

    prompt = qo.render_prompt(processor.tokenizer, "How many beeps?", ["one", "two"])
    audio = np.sin(np.linspace(0, 3000, 24_000)).astype(np.float32)
    batch = processor([prompt], [audio], targets=[qo.render_target(prompt, "Two onsets.", "two")], padding_side="right")
    del batch["labels"]
    with torch.no_grad():
        base = qo.load_thinker(tiny_checkpoint, "float32")(**batch).logits
        adapted = PeftModel.from_pretrained(qo.load_thinker(tiny_checkpoint, "float32"), str(tmp_path / "adapter")).eval()(**batch).logits
        merged = qo.load_thinker(tmp_path / "merged", "float32")(**batch).logits
    assert (adapted - base).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)
    merged_processor = qo.OmniProcessor.from_pretrained(tmp_path / "merged")
    assert merged_processor.tokenizer.chat_template == processor.tokenizer.chat_template


def test_merged_checkpoint_has_the_base_layout(tiny_checkpoint, tmp_path):
    """A merged folder replaces the base everywhere (vLLM included): composite config, thinker. names,
    shards, and every tokenizer/processor/generation file of the base unchanged."""
    import json

    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open

    from core.outdir import MARKER
    from train.merge import merge

    model = qo.load_thinker(tiny_checkpoint, "float32")
    config = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=qo.lora_target_names(model, ("q_proj",)))
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    merged = merge(tiny_checkpoint, tmp_path / "adapter", tmp_path / "merged")

    def tensor_names(folder):
        return set(json.loads((folder / qo.WEIGHT_INDEX).read_text())["weight_map"])

    shards = sorted(merged.glob("model-*.safetensors"))
    assert len(shards) > 1 and all(qo.SHARD_PATTERN.fullmatch(p.name) for p in shards)
    assert {p.name for p in merged.iterdir()} - {p.name for p in shards} - {MARKER} == {
        p.name for p in tiny_checkpoint.iterdir() if not qo.SHARD_PATTERN.fullmatch(p.name)}
    assert json.loads((merged / "config.json").read_text()) == json.loads((tiny_checkpoint / "config.json").read_text())
    assert tensor_names(merged) == tensor_names(tiny_checkpoint)
    with safe_open(str(shards[0]), "pt") as f:
        assert all(name.startswith("thinker.") for name in f.keys())
    for name in ("chat_template.json", "preprocessor_config.json", "generation_config.json", "tokenizer_config.json",
                 "vocab.json", "merges.txt"):
        assert (merged / name).read_bytes() == (tiny_checkpoint / name).read_bytes(), name
    assert json.loads((merged / "preprocessor_config.json").read_text())["processor_class"] == "Qwen3OmniMoeProcessor"


def test_lora_placement(tiny_checkpoint):
    from core.recipe import LoraConfig
    from train.lora import LoraPlacementError, apply_lora

    def placed(**fields):
        return apply_lora(qo.load_thinker(tiny_checkpoint, "float32"), LoraConfig(**fields))[1]

    assert placed() == {"text_attention": 8}
    assert placed(experts=True, dropout=0.0) == {"text_attention": 8, "experts": 4}  # gate_up_proj + down_proj per layer
    with_audio = placed(targets=["q_proj"], include_audio_tower=True)
    assert with_audio["text_attention"] == 2 and with_audio["audio_tower"] > 0
    with pytest.raises(LoraPlacementError, match="foo_proj"):
        placed(targets=["q_proj", "foo_proj"])
    with pytest.raises(LoraPlacementError, match="match no"):
        placed(targets=[])


# --- fast paths (issue 8): feature cache, dataloader workers, experts implementation ---------


def test_cached_features_give_the_waveform_batch(recipe_file, processor, tmp_path):
    from train.data import SFTCollator, SFTDataset, build_examples, feature_cache_for

    recipe = load_recipe(recipe_file, [f"data.feature_cache={tmp_path / 'features'}"])
    examples = build_examples(recipe.data, processor, "baseline", seed=0, log=lambda *_: None)[:5]
    cache = feature_cache_for(recipe.data, processor)
    collate = SFTCollator(processor)
    from_waves = collate([SFTDataset(examples, 30.0)[i] for i in range(5)])
    cold = collate([SFTDataset(examples, 30.0, cache)[i] for i in range(5)])
    warm = collate([SFTDataset(examples, 30.0, cache)[i] for i in range(5)])
    assert (cache.misses, cache.hits) == (5, 5)  # the second pass read every clip from disk
    for batch in (cold, warm):
        assert batch.keys() == from_waves.keys() and batch["ids"] == from_waves["ids"]
        for key in from_waves.keys() - {"ids"}:
            assert torch.equal(batch[key], from_waves[key]), key


def test_feature_cache_and_workers_keep_the_losses(recipe_file, tmp_path):
    base = run_sft(recipe_file, f"train.output_dir={tmp_path}/base")
    cached = run_sft(recipe_file, f"train.output_dir={tmp_path}/cached", f"data.feature_cache={tmp_path}/features")
    workers = run_sft(recipe_file, f"train.output_dir={tmp_path}/workers", "data.num_workers=2")
    assert len(list((tmp_path / "features").rglob("*.npy"))) == 12  # 3 steps of 4 distinct clips
    seen = lambda run: (run / "seen" / "rank0.jsonl").read_text()
    for run in (cached, workers):
        assert seen(run) == seen(base)
        assert [m["target_tokens"] for m in metrics(run)] == [m["target_tokens"] for m in metrics(base)]
        np.testing.assert_allclose([m["loss"] for m in metrics(run)], [m["loss"] for m in metrics(base)], rtol=1e-6)


def test_recipe_experts_implementation_reaches_the_trained_model(recipe_file, tmp_path, monkeypatch):
    loaded = []

    def spy(*args, **kwargs):
        loaded.append(load_thinker(*args, **kwargs))
        return loaded[-1]

    load_thinker = qo.load_thinker
    monkeypatch.setattr(qo, "load_thinker", spy)
    run_sft(recipe_file, f"train.output_dir={tmp_path}/run", "train.max_steps=1", "model.experts_implementation=eager")
    assert [m.config.text_config._experts_implementation for m in loaded] == ["eager"]  # the default is grouped_mm
