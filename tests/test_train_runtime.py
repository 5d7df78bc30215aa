"""The trainers' shared runtime (train/runtime.py): one definition of what SFT and GRPO share, the same
launch checks and model loading in both, and setting mistakes as one-line errors."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from core import qwen_omni as qo
from core.recipe import RecipeError, load_recipe
from tests.test_grpo import metrics, run_grpo

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def top_level_functions(path: Path) -> set[str]:
    return {node.name for node in ast.parse(path.read_text()).body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_the_trainers_define_nothing_the_runtime_does_and_grpo_does_not_import_sft():
    shared = top_level_functions(REPO / "train" / "runtime.py")
    for trainer in ("sft", "grpo"):
        assert top_level_functions(REPO / "train" / f"{trainer}.py") & shared == set(), trainer
    tree = ast.parse((REPO / "train" / "grpo.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name and name.split(".")[-1] == "sft"}, imported


def cli_run(trainer: str, recipe: Path, *overrides: str) -> int:
    from accelerate.state import AcceleratorState

    import train.grpo
    import train.sft
    from train.runtime import cli

    AcceleratorState._reset_state(True)
    return cli({"sft": train.sft.main, "grpo": train.grpo.main}[trainer], [str(recipe), *overrides])


@pytest.mark.parametrize("trainer, override, key", [
    ("sft", "train.zero_stage=3", "train.zero_stage"),
    ("grpo", "train.zero_stage=3", "train.zero_stage"),  # GRPO used to launch anyway
    ("sft", "train.batch_size=32", "train.batch_size"),  # 24 samples: no full step
    ("grpo", "grpo.num_generations=3", "grpo.num_generations"),
    ("sft", "lora.targets=[foo_proj]", "lora.targets"),
    ("grpo", "grpo.stages=[]", "grpo.stages"),
])
def test_setting_mistakes_are_one_line_errors_naming_the_key(trainer, override, key, recipe_file, grpo_recipe, capsys,
                                                             tmp_path):
    recipe = {"sft": recipe_file, "grpo": grpo_recipe}[trainer]
    assert cli_run(trainer, recipe, override) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and key in errors[0] and "Traceback" not in err, err


def fake_accelerator(stage: int):
    """What zero_stage and check_launch read of a DeepSpeed launch at ZeRO `stage`."""
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                           state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))


def test_launch_checks_of_both_trainers_under_zero3(grpo_recipe, tmp_path):
    from train.grpo import check_settings
    from train.runtime import check_launch

    recipe = load_recipe(grpo_recipe, ["train.zero_stage=3"])
    check_launch(fake_accelerator(3), recipe)
    with pytest.raises(RecipeError, match=r"^train\.zero_stage=3 .* runs ZeRO stage 2"):
        check_launch(fake_accelerator(2), recipe)
    # both trainers score tokens in chunks when asked (train/loss.py): ZeRO-3's sharded lm_head cannot
    with pytest.raises(RecipeError, match=r"^train\.loss_chunk_tokens is not supported under ZeRO-3"):
        check_launch(fake_accelerator(3), load_recipe(grpo_recipe, ["train.loss_chunk_tokens=64"]))
    with pytest.raises(RecipeError, match=r"^train\.max_nonfinite_steps > 0 cannot skip steps under DeepSpeed"):
        check_launch(fake_accelerator(2), load_recipe(grpo_recipe, ["train.max_nonfinite_steps=1"]))
    adapter = [f"grpo.init_adapter={tmp_path}"]
    check_settings(load_recipe(grpo_recipe, adapter), 2)
    with pytest.raises(RecipeError, match=r"^grpo\.beta > 0 with grpo\.init_adapter"):
        check_settings(load_recipe(grpo_recipe, adapter), 3)


HUB_ID = "Qwen/Tiny-Omni-Test"


def test_grpo_loads_processor_and_policy_from_the_hub_when_allowed(grpo_recipe, tmp_path, tiny_checkpoint, monkeypatch):
    """A hub id with model.allow_hub=true: both the policy and the processor come from it (the hub is the tiny
    kit here); without the opt-in the run is refused, naming model.allow_hub."""
    asked = []

    def from_hub(load):
        def fake(path, *args, allow_hub: bool = False, **kwargs):
            asked.append((load.__name__, allow_hub))
            # as the hub would: the id resolves only with the opt-in (qo.checkpoint_source)
            return load(tiny_checkpoint if path == HUB_ID and allow_hub else path, *args, allow_hub=allow_hub, **kwargs)
        return fake

    monkeypatch.setattr(qo, "load_thinker", from_hub(qo.load_thinker))
    monkeypatch.setattr(qo.OmniProcessor, "from_pretrained", from_hub(qo.OmniProcessor.from_pretrained))
    run = run_grpo(grpo_recipe, f"model.path={HUB_ID}", "model.allow_hub=true", "grpo.iterations=1", "train.stop_after=1")
    assert [m["step"] for m in metrics(run)] == [1]
    assert sorted(set(asked)) == [("from_pretrained", True), ("load_thinker", True)]
    with pytest.raises(qo.CheckpointNotFound, match="model.allow_hub=true"):
        run_grpo(grpo_recipe, f"train.output_dir={tmp_path}/refused", f"model.path={HUB_ID}", "train.stop_after=1")


@pytest.mark.slow
def test_two_cpu_ranks_train_as_one_process_with_their_global_batch(recipe_file, tmp_path):
    """`make train`'s launch (2 CPU ranks, recipes/accelerate/cpu_ddp_2proc.yaml) is data parallel for real: the
    ranks' gradients are all-reduced, so 2 steps on 2 ranks of batch 2 give the adapter of 2 steps on one process
    of batch 4. Ranks that each trained alone on their half (Accelerate's DistributedType.NO) end ~lr apart."""
    from tests.test_train import adapter_weights, launch_ranks

    def train(out: str, *launch: str, batch: int):
        overrides = [f"train.output_dir={tmp_path / out}", f"train.batch_size={batch}", "train.max_steps=2", "train.lr=1e-3"]
        if launch:
            done = launch_ranks(launch[0], str(REPO / "train" / "sft.py"), str(recipe_file), *overrides)
        else:
            done = subprocess.run([sys.executable, str(REPO / "train" / "sft.py"), str(recipe_file), *overrides], cwd=REPO,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
        return adapter_weights(tmp_path / out / "adapter")

    two_ranks = train("two", "cpu_ddp_2proc.yaml", batch=2)
    one = train("one", batch=4)
    assert two_ranks.keys() == one.keys()
    moved = max(float(w.abs().max()) for name, w in one.items() if "lora_B" in name)
    assert moved > 5e-4  # trained: LoRA B starts at zero and takes ~lr per Adam step
    worst = max(float((two_ranks[k] - one[k]).abs().max()) for k in one)
    assert worst < 5e-5, worst
