from pathlib import Path

import pytest
import yaml

from core.recipe import RecipeError, load_recipe, save_recipe, split_cli

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name != "unnamed"
    if path.name != "baseline.yaml":  # the official baseline is the untuned model: inference only
        assert recipe.data.train or recipe.grpo.stages, "a shipped recipe must name its training data (RL: in grpo.stages)"


@pytest.mark.parametrize("path", sorted((RECIPES / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_every_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))
    if config.distributed_type == "DEEPSPEED":
        ds_file = Path(config.deepspeed_config["deepspeed_config_file"])
        assert (RECIPES.parent / ds_file).is_file(), f"{path.name} points at missing {ds_file}"


def test_cogito_recipe_is_the_paper_recipe():
    recipe = load_recipe(RECIPES / "cogito.yaml")
    assert "Qwen3-Omni-30B-A3B-Thinking" in recipe.model.path
    assert recipe.train.lr == 1e-5 and recipe.train.epochs == 1
    assert recipe.train.mixed_precision == "bf16" and recipe.model.dtype == "bfloat16"


def test_dotted_overrides_are_typed():
    recipe = load_recipe(RECIPES / "tiny.yaml", ["train.lr=2e-5", "lora.r=4", "lora.targets=[q_proj]", "infer.limit=null"])
    assert recipe.train.lr == pytest.approx(2e-5)
    assert recipe.lora.r == 4 and recipe.lora.targets == ["q_proj"] and recipe.infer.limit is None


def test_unknown_key_names_its_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"lrr": 1e-5}}))
    with pytest.raises(RecipeError, match=r"train\.lrr"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match=r"lora\.rank"):
        load_recipe(None, ["lora.rank=8"])
    with pytest.raises(RecipeError, match=r"judge\.modell"):
        load_recipe(None, ["eval.judge.modell=x"])


def test_wrong_type_names_its_path(tmp_path):
    with pytest.raises(RecipeError, match=r"train\.batch_size"):
        load_recipe(None, ["train.batch_size=four"])
    with pytest.raises(RecipeError, match=r"model\.dtype"):
        load_recipe(None, ["model.dtype=float8"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  train:\n    - {path: a.jsonl, weight: -1}\n")
    with pytest.raises(RecipeError, match=r"data\.train\.0\.weight"):
        load_recipe(bad)


def test_bad_files_and_arguments(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(tmp_path / "list.yaml")
    with pytest.raises(RecipeError, match="dotted.key=value"):
        load_recipe(None, ["=3"])
    with pytest.raises(RecipeError, match="unexpected argument"):
        split_cli(["a.yaml", "b.yaml"])
    assert split_cli(["a.yaml", "x.y=1"]) == ("a.yaml", ["x.y=1"])


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(RECIPES / "tiny.yaml", ["train.seed=7"])
    saved = save_recipe(recipe, tmp_path / "run" / "recipe.yaml")
    assert load_recipe(saved) == recipe
    assert yaml.safe_load(saved.read_text())["train"]["seed"] == 7
