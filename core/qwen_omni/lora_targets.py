"""Where LoRA goes in the thinker: the text layers' projections and fused experts, never the audio tower
or the vision parts unless a recipe asks."""

from __future__ import annotations

import re
from typing import Sequence

import torch

# Parts of the thinker that LoRA must leave alone unless a recipe asks otherwise.
NON_TEXT_MODULES = ("audio_tower", "visual")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# transformers 5 fuses the experts into 3-D parameters; LoRA reaches them via `target_parameters`.
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


def text_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of the thinker's language model, wherever this transformers version puts them."""
    text_model = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    layers = getattr(text_model, "layers", None) or getattr(getattr(text_model, "language_model", None), "layers", None)
    if layers is None:
        raise AttributeError("cannot find the thinker's text decoder layers")
    return layers


def lora_target_names(model, projections: Sequence[str], include_audio_tower: bool = False) -> list[str]:
    """Exact module names for LoRA: the given projections in the text layers (and the audio tower if asked).

    Exact names, not a regex: peft widens patterns to suffix matches, which on this model also
    hits the audio tower's q/k/v projections.
    """
    wanted = set(projections)
    names = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in wanted or not isinstance(module, torch.nn.Linear):
            continue
        in_non_text = any(part in NON_TEXT_MODULES for part in name.split("."))
        if in_non_text and not (include_audio_tower and ".audio_tower." in f".{name}."):
            continue
        names.append(name)
    return names


def expert_parameter_names(model) -> list[str]:
    """Fused expert parameters (transformers 5) for peft's `target_parameters`."""
    return [
        name for name, _ in model.named_parameters()
        if re.search(r"\.experts\.(%s)$" % "|".join(EXPERT_PARAMETERS), name)
        and not any(part in NON_TEXT_MODULES for part in name.split("."))
    ]
