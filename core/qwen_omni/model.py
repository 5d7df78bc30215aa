"""The thinker's transformers classes (imported on first use) and facts read off a model or its config."""

from __future__ import annotations

import torch


def modeling_module():
    # transformers is imported on first use: it takes ~5 s (it pulls in sklearn), which light
    # commands (data generation, scoring) do not need to pay.
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe

    return modeling_qwen3_omni_moe


def thinker_class():
    return modeling_module().Qwen3OmniMoeThinkerForConditionalGeneration


def moe_block_class():
    """The sparse MoE block: ZeRO-3 must treat it as a leaf, else it hangs on experts that get no tokens."""
    return modeling_module().Qwen3OmniMoeThinkerTextSparseMoeBlock


def audio_tower_class():
    return modeling_module().Qwen3OmniMoeAudioEncoder


def full_numel(param: torch.Tensor) -> int:
    """Elements of a parameter, also when ZeRO-3 holds only this rank's shard of it."""
    return getattr(param, "ds_numel", param.numel())


def context_length(config) -> int | None:
    """Positions the text model takes (prompt + generation), from a thinker, composite or plain LM config."""
    for cfg in (config, getattr(config, "text_config", None), getattr(getattr(config, "thinker_config", None), "text_config", None)):
        if cfg is not None and getattr(cfg, "max_position_embeddings", None):
            return int(cfg.max_position_embeddings)
    return None
