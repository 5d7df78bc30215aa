"""Recipes: typed, validated configuration loaded from YAML with dotted command-line overrides.

    recipe = load_recipe("recipes/tiny.yaml", ["train.lr=2e-5", "lora.r=8"])

Unknown keys and wrong types raise `RecipeError` naming the key's dotted path. Every run writes
its resolved recipe beside its outputs (`save_recipe`), so a result can always be traced back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class RecipeError(ValueError):
    """A recipe that does not validate; the message names the file and each bad key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    path: str = "artifacts/tiny-omni"  # local checkpoint folder (thinker-only or full Qwen3-Omni)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None
    prompt_style: Literal["baseline", "qwen"] = "baseline"


class DatasetSpec(Section):
    path: str  # MMAR-schema or SFT JSONL
    audio_root: str | None = None  # folder that `audio_path` is relative to; default: the JSONL's folder
    weight: float = Field(1.0, gt=0)  # mixing ratio relative to the other datasets
    max_samples: int | None = Field(None, gt=0)


class DataConfig(Section):
    train: list[DatasetSpec] = Field(default_factory=list)
    max_audio_seconds: float = Field(30.0, gt=0)
    max_length: int = Field(4096, gt=0)  # tokens; longer samples are dropped and counted
    num_workers: int = Field(0, ge=0)


class LoraConfig(Section):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    experts: bool = False  # also adapt the fused MoE experts (target_parameters)
    include_audio_tower: bool = False

    @model_validator(mode="after")
    def _no_dropout_on_experts(self) -> "LoraConfig":
        if self.experts and self.dropout:
            raise ValueError("lora.experts=true needs lora.dropout=0: peft cannot apply dropout to fused expert parameters")
        return self


class TrainConfig(Section):
    output_dir: str = "runs/tiny"
    seed: int = 42
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)  # overrides epochs when set
    lr: float = Field(1e-5, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(1, gt=0)  # per device
    grad_accum: int = Field(1, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    group_by_length: bool = True
    save_every: int = Field(100, gt=0)  # optimizer steps
    keep_last: int = Field(2, gt=0)
    resume: bool = True  # pick up the latest checkpoint in output_dir
    stop_after: int | None = Field(None, gt=0)  # stop (with a checkpoint) after this step; the schedule is unchanged
    log_every: int = Field(1, gt=0)
    report_to: Literal["none", "wandb", "tensorboard"] = "none"
    wandb_project: str = "audio-reasoning"


class InferConfig(Section):
    backend: Literal["hf", "vllm"] = "hf"
    meta: str = "artifacts/synthetic/test.jsonl"
    audio_root: str | None = None
    output: str = "runs/tiny/submission.jsonl"
    adapter: str | None = None  # LoRA adapter folder applied on top of model.path (hf backend)
    batch_size: int = Field(8, gt=0)
    max_new_tokens: int = Field(16384, gt=0)
    do_sample: bool | None = None  # None: from the checkpoint's generation config
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int = 0
    limit: int | None = Field(None, gt=0)  # first N items only
    tensor_parallel_size: int = Field(1, gt=0)  # vllm
    data_parallel_size: int = Field(1, gt=0)  # vllm
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)  # vllm


class JudgeConfig(Section):
    backend: Literal["openai", "local", "none"] = "none"
    model: str = "gpt-4o-2024-11-20"
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0
    seed: int = 42
    ratings: int = Field(5, gt=0)
    max_attempts: int = Field(20, gt=0)
    concurrency: int = Field(8, gt=0)
    requests_per_minute: float | None = Field(None, gt=0)
    timeout_s: float = Field(120.0, gt=0)
    cache: str = "runs/judge_cache.sqlite"


class EvalConfig(Section):
    meta: str = "artifacts/synthetic/test.jsonl"
    submission: str = "runs/tiny/submission.jsonl"
    report_dir: str = "runs/tiny/eval"
    judge: JudgeConfig = Field(default_factory=JudgeConfig)


class Recipe(Section):
    name: str = "unnamed"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _precision_matches_dtype(self) -> "Recipe":
        if self.train.mixed_precision == "bf16" and self.model.dtype in ("float16",):
            raise ValueError("train.mixed_precision=bf16 needs model.dtype bfloat16, float32 or auto")
        return self


def apply_override(tree: dict, override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, lists, null)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {override!r} is not of the form dotted.key=value")
    *parents, leaf = key.strip().split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override {override!r}: {'.'.join(parents[: i + 1])} is not a section")
        node = child
    node[leaf] = yaml.safe_load(raw)


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid recipe"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(root)"
        lines.append(f"  {where}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def recipe_from_dict(tree: dict[str, Any], source: str = "<dict>") -> Recipe:
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise RecipeError(_format_errors(source, err)) from None


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a YAML recipe (or the defaults when `path` is None) and apply dotted overrides."""
    tree: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise RecipeError(f"{source}: recipe file not found") from None
        except yaml.YAMLError as err:
            raise RecipeError(f"{source}: not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise RecipeError(f"{source}: a recipe must be a mapping of sections")
    for override in overrides:
        apply_override(tree, override)
    return recipe_from_dict(tree, source + (f" with overrides {list(overrides)}" if overrides else ""))


def save_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write the resolved recipe (defaults filled in) as YAML."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    return out


def split_cli(argv: list[str]) -> tuple[str | None, list[str]]:
    """`[recipe.yaml] [a.b=c ...]` -> (recipe path, overrides)."""
    path, overrides = None, []
    for arg in argv:
        if "=" in arg:
            overrides.append(arg)
        elif path is None and not overrides:
            path = arg
        else:
            raise RecipeError(f"unexpected argument {arg!r}: expected RECIPE.yaml, then dotted.key=value overrides")
    return path, overrides
