"""LoRA on the thinker: exact target names, then a check of where the adapters actually landed."""

from __future__ import annotations

from collections import Counter

from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from core import qwen_omni as qo
from core.recipe import LoraConfig, RecipeError

GROUPS = ("text_attention", "experts", "audio_tower", "other")


class LoraPlacementError(RecipeError):
    """The recipe's LoRA targets match nothing, or land where the recipe did not ask."""


def module_group(name: str) -> str:
    parts = name.split(".")
    if "audio_tower" in parts:
        return "audio_tower"
    if "experts" in parts:
        return "experts"
    if "self_attn" in parts and "visual" not in parts:
        return "text_attention"
    return "other"


def placement(model) -> Counter:
    """Number of adapted modules per group (one module holds both its lora_A and lora_B)."""
    adapted = {name.split(".lora_A.")[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    return Counter(module_group(name) for name in adapted)


def apply_lora(model, config: LoraConfig):
    """Wrap `model` with peft LoRA as the recipe says; everything else is frozen."""
    modules = qo.lora_target_names(model, config.targets, config.include_audio_tower)
    parameters = qo.expert_parameter_names(model) if config.experts else []
    unmatched = sorted(set(config.targets) - {name.rsplit(".", 1)[-1] for name in modules})
    if unmatched or not (modules or parameters):
        raise LoraPlacementError(
            f"lora.targets: {unmatched or config.targets} match no Linear module of the thinker's text layers "
            f"(its attention projections are {list(qo.ATTENTION_PROJECTIONS)}; experts go through lora.experts=true)"
        )
    peft_config = PeftLoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
        # exact names: peft widens patterns to suffixes, which would also hit the audio tower
        target_modules=modules or None, target_parameters=parameters or None,
        exclude_modules=None if config.include_audio_tower else r".*(audio_tower|visual).*",
    )
    model = get_peft_model(model, peft_config)
    counts = placement(model)
    if config.experts and not counts["experts"]:
        raise LoraPlacementError("lora.experts=true but no adapter landed on the MoE experts")
    if counts["audio_tower"] and not config.include_audio_tower:
        raise LoraPlacementError(
            f"{counts['audio_tower']} adapters landed in the audio tower; set lora.include_audio_tower=true if intended"
        )
    return model, counts
