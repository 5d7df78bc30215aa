from pathlib import Path

import pytest
import yaml

from core.recipe import RecipeError, Section, description, load_recipe, result_keys, save_recipe, split_cli

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


def sections(cls=None):
    """Every recipe section class."""
    found = []
    for sub in (cls or Section).__subclasses__():
        found += [sub, *sections(sub)]
    return found


def test_every_field_has_a_docstring():
    undocumented = [f"{cls.__name__}.{name}" for cls in sections() for name in cls.model_fields
                    if not description(cls, name)]
    assert undocumented == [], "add a docstring under these fields in core/recipe.py"


TRAINING = ["model.path", "model.dtype", "model.prompt_style",
            "data.train", "data.max_audio_seconds", "data.max_length",
            "lora.r", "lora.alpha", "lora.dropout", "lora.targets", "lora.experts", "lora.include_audio_tower",
            "train.seed", "train.epochs", "train.max_steps", "train.lr", "train.min_lr_ratio", "train.schedule",
            "train.warmup_ratio", "train.weight_decay", "train.batch_size", "train.grad_accum", "train.max_grad_norm",
            "train.mixed_precision", "train.gradient_checkpointing", "train.zero_stage", "train.group_by_length",
            "train.init_adapter"]
GRPO = TRAINING + [
    "grpo.init_adapter", "grpo.num_generations", "grpo.max_new_tokens", "grpo.temperature", "grpo.top_p", "grpo.top_k",
    "grpo.rollout_batch_size", "grpo.clip_low", "grpo.clip_high", "grpo.beta", "grpo.iterations", "grpo.scale_rewards",
    "grpo.loss_type", "grpo.importance_sampling_level", "grpo.rollout_engine", "grpo.rollout_logprobs", "grpo.tis_cap",
    "grpo.vllm.max_model_len", "grpo.embedding_model", "grpo.judge.backend", "grpo.judge.model", "grpo.judge.base_url",
    "grpo.judge.temperature",
    "grpo.judge.seed", "grpo.judge.max_tokens", "grpo.judge.ratings", "grpo.judge.max_attempts", "grpo.judge.dtype",
    "grpo.judge.device", "grpo.stages", "infer.thinking_budget"]
INFERENCE = ["model.path", "model.dtype", "model.prompt_style", "infer.backend", "infer.meta", "infer.adapter",
             "infer.max_new_tokens", "infer.min_new_tokens", "infer.thinking_budget", "infer.do_sample",
             "infer.temperature", "infer.top_p", "infer.top_k", "infer.seed", "infer.max_model_len", "infer.max_audio_seconds",
             "infer.self_consistency", "infer.mata",
             "infer.audio_ablation"]


def test_the_settings_that_change_results_are_the_ones_listed():
    # a new field lands in one of these lists or is tagged NoEffect: a decision, not a default
    from infer.run import SECTIONS

    recipe = load_recipe(None)
    assert result_keys(recipe, ("model", "data", "lora", "train")) == TRAINING
    assert result_keys(recipe, ("model", "data", "lora", "train", "grpo", "infer.thinking_budget")) == GRPO
    assert result_keys(recipe, SECTIONS) == INFERENCE
    assert result_keys(recipe, ("infer.limit_mm_per_prompt", "grpo.judge.concurrency", "train.lr")) == ["train.lr"]


def test_training_resumes_with_other_no_effect_settings_and_refuses_others(tmp_path):
    from train.grpo import GRPO_ALSO, GRPO_SECTIONS
    from train.runtime import TrainingError, check_resumable

    def check_grpo_resumable(recipe, out):
        check_resumable(recipe, out, GRPO_SECTIONS, GRPO_ALSO)

    out = tmp_path / "run"
    save_recipe(load_recipe(RECIPES / "tiny.yaml", [f"train.output_dir={out}"]), out / "recipe.yaml")
    (out / "adapter").mkdir()
    moved = [f"train.output_dir={out}", "train.log_every=5", "train.save_every=3", "data.num_workers=2",
             "data.cache_workers=3", "model.attn_implementation=eager", "grpo.judge.timeout_s=5", "infer.batch_size=1"]

    def rerun(*changed):
        return load_recipe(RECIPES / "tiny.yaml", [*moved, *changed])

    check_resumable(rerun(), out)
    check_grpo_resumable(rerun(), out)
    with pytest.raises(TrainingError, match=r"Differing: train\.lr: 0\.003 -> 0\.001\. Restore them"):
        check_resumable(rerun("train.lr=1e-3"), out)
    with pytest.raises(TrainingError, match=r"Differing: grpo\.judge\.ratings: 5 -> 3; infer\.thinking_budget: 2000 -> 50\."):
        check_grpo_resumable(rerun("grpo.judge.ratings=3", "infer.thinking_budget=50"), out)
    check_resumable(rerun("grpo.beta=0.5"), out)  # SFT does not read grpo
