"""The demo learns from the audio: the tiny recipe, built, trained and answered as `make demo` does
(the base pre-trained and the LoRA fine-tuned on 2 CPU ranks), scores well on held-out items. Any
mismatch between training and inference (prompt, label masking, audio features, adapter loading)
drops the format rate to ~0 and fails here.

Slow (~2-3 CPU minutes: the base's 300 pre-training steps, 360 LoRA steps, 120 answers); CI runs it
with the rest of the suite.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.recipe import load_recipe
from tests.test_train import launch_ranks

REPO = Path(__file__).resolve().parents[1]
RANKS = "cpu_ddp_2proc.yaml"  # what the Makefile launches `make tiny` and `make train` with

# The targets are format >= 95 % and accuracy >= 80 %, above chance on every task type. This
# recipe measured 99.2 % format and 96.7 % accuracy in `make demo` (README, after the 2-rank DDP fix;
# 98.3 / 98.3 before it). Format is held at its target, accuracy at 85 % (over the 80 % target): both leave room for
# float rounding on another CPU to flip a few borderline items (each of 120 moves a rate by 0.83 points).
MIN_FORMAT = 95.0
MIN_ACCURACY = 85.0
MAX_SILENT_ABOVE_CHANCE = 15.0  # accuracy with silent audio, points above chance


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the answers, in this process


@pytest.mark.slow
def test_tiny_recipe_learns_to_answer_from_the_audio(tmp_path):
    from data_prep.synthetic import generate
    from eval.reliance import reliance
    from eval.side_by_side import item_results, rates
    from eval.submission import load_meta
    from infer.run import run

    synthetic = tmp_path / "synthetic"
    generate(synthetic, seed=0, pretrain=960)  # the demo's sizes: `make data`
    checkpoint = tmp_path / "tiny-omni"
    launch_ranks(RANKS, "-m", "core.tiny", str(checkpoint), "--pretrain", str(synthetic / "pretrain.jsonl"), timeout=900)
    recipe_file = tmp_path / "recipe.yaml"
    tree = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    tree["model"]["path"] = str(checkpoint)
    tree["data"]["train"] = [{"path": str(synthetic / "train.jsonl")}]
    tree["train"]["output_dir"] = str(tmp_path / "run")
    tree["infer"].update(meta=str(synthetic / "test.jsonl"), output=str(tmp_path / "run" / "submission.jsonl"),
                         adapter=str(tmp_path / "run" / "adapter"))
    recipe_file.write_text(yaml.safe_dump(tree))

    launch_ranks(RANKS, str(REPO / "train" / "sft.py"), str(recipe_file), timeout=900)
    # two ranks, each with its half of every step: the launch is not two single-process runs
    seen = [(tmp_path / "run" / "seen" / f"rank{r}.jsonl").read_text().splitlines() for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 360
    run(load_recipe(recipe_file))

    meta = load_meta(synthetic / "test.jsonl")
    results = item_results(tmp_path / "run" / "submission.jsonl", meta)
    overall = rates(results, "all")
    assert overall["n"] == 120
    assert overall["format"] >= MIN_FORMAT, overall
    assert overall["accuracy"] >= MIN_ACCURACY, overall
    # Above chance on every task type (the lowest measured: counting 90 % against 25 %).
    for task in {rec["sub-category"] for rec in meta}:
        chance = 100 * sum(1 / len(rec["choices"]) for rec in meta if rec["sub-category"] == task) / 20
        assert rates(results, task)["accuracy"] > chance, (task, rates(results, task), chance)

    # ... and it listens: with every clip silenced (infer.audio_ablation=silence, as `make demo`'s silent run)
    # its accuracy falls to about chance (measured 96.7 -> 20.8 %, chance 43.1 %: docs/demo.md)
    silent = tmp_path / "run" / "silent" / "submission.jsonl"
    run(load_recipe(recipe_file, ["infer.audio_ablation=silence", f"infer.output={silent}"]))
    figures = reliance(tmp_path / "run" / "submission.jsonl", silent, synthetic / "test.jsonl")
    assert not figures["hardly_drops"] and figures["accuracy_ablated"] <= figures["chance"] + MAX_SILENT_ABOVE_CHANCE, figures
