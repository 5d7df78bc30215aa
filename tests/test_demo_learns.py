"""The demo learns from the audio: the tiny recipe, trained and answered through the real commands,
scores well on held-out items. Any mismatch between training and inference
(prompt, label masking, audio features, adapter loading) drops it to chance and fails here.

Slow (~5 CPU minutes: the base's 300 pre-training steps, 540 LoRA steps, 120 answers); CI runs it
with the rest of the suite.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]

# The targets are format >= 95 % and accuracy >= 80 %, above chance on every task type. This
# recipe measured format 100 % and accuracy 99.2 % (README; the same seeds give the same run on one
# machine); two other seeds at 6 instead of 9 epochs gave 84 % and 93 %. Format is held at its
# target, accuracy at 85 % (over the 80 % target): both leave room for float rounding on another CPU
# to flip a few borderline items (each of 120 moves a rate by 0.83 points). A train/infer mismatch gives ~0 % format or chance accuracy (~43 %).
MIN_FORMAT = 95.0
MIN_ACCURACY = 85.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_tiny_recipe_learns_to_answer_from_the_audio(tmp_path):
    from accelerate.state import AcceleratorState

    from core.tiny import build_tiny_checkpoint
    from data_prep.synthetic import generate
    from eval.side_by_side import item_results, rates
    from eval.submission import load_meta
    from infer.run import run
    from train.sft import main as sft

    synthetic = tmp_path / "synthetic"
    generate(synthetic, seed=0, pretrain=960)  # the demo's sizes: `make data`
    checkpoint = build_tiny_checkpoint(tmp_path / "tiny-omni", pretrain=synthetic / "pretrain.jsonl")
    recipe_file = tmp_path / "recipe.yaml"
    tree = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    tree["model"]["path"] = str(checkpoint)
    tree["data"]["train"] = [{"path": str(synthetic / "train.jsonl")}]
    tree["train"]["output_dir"] = str(tmp_path / "run")
    tree["infer"].update(meta=str(synthetic / "test.jsonl"), output=str(tmp_path / "run" / "submission.jsonl"),
                         adapter=str(tmp_path / "run" / "adapter"))
    recipe_file.write_text(yaml.safe_dump(tree))

    AcceleratorState._reset_state(True)
    assert sft([str(recipe_file)]) == 0
    run(load_recipe(recipe_file))

    meta = load_meta(synthetic / "test.jsonl")
    results = item_results(tmp_path / "run" / "submission.jsonl", meta)
    overall = rates(results, "all")
    assert overall["n"] == 120
    assert overall["format"] >= MIN_FORMAT, overall
    assert overall["accuracy"] >= MIN_ACCURACY, overall
    # Above chance on every task type (the lowest measured: counting 95 % against 25 %).
    for task in {rec["sub-category"] for rec in meta}:
        chance = 100 * sum(1 / len(rec["choices"]) for rec in meta if rec["sub-category"] == task) / 20
        assert rates(results, task)["accuracy"] > chance, (task, rates(results, task), chance)
