"""Training-free audio-attention boosting on the thinker (MATA, "Pay More Attention To Audio", arXiv 2509.18816).

On the chosen decoder layers, the last query token (the one that predicts the next token: the prompt's
last position at prefill, the single new token at each decoding step) pays `strength` times more
attention to every audio token of its clip, relative to every other key: its attention logits on the
audio keys get + log(strength) before the softmax, which renormalises. Every other query row, every
other layer and every weight stay as they are; with no boost installed nothing is touched at all.

The boost rides on the attention mask the decoder passes to each layer (a float bias is what both the
eager and the SDPA kernels add to the logits), so it works with either; FlashAttention takes no bias
and is refused. The published method intervenes on the raw scores; the multiplicative form here is
the one whose effect is exact and testable (tests/test_self_consistency_mata.py).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

_BIAS_ATTENTION = ("eager", "sdpa")  # implementations that add a float mask to the attention logits


class AudioAttentionBoost:
    """Installs the boost on `thinker` (a Qwen3-Omni thinker, adapter merged or not) until `remove()`."""

    def __init__(self, thinker, layers: Sequence[int], strength: float):
        text_model = thinker.model
        n_layers = len(text_model.layers)
        bad = [layer for layer in layers if not 0 <= layer < n_layers]
        if bad:
            raise ValueError(f"infer.mata.layers: {bad} out of range; the thinker has layers 0..{n_layers - 1}")
        implementation = text_model.config._attn_implementation
        if implementation not in _BIAS_ATTENTION:
            raise ValueError(f"infer.mata: needs model.attn_implementation in {_BIAS_ATTENTION} (the boost is an attention "
                             f"bias), got {implementation!r}")
        self.audio_token_id = thinker.config.audio_token_id
        self.log_strength = math.log(strength)
        self.audio_keys: torch.Tensor | None = None  # [batch, prompt length]: the prompt's audio positions
        self.handles = [thinker.register_forward_pre_hook(self._see_prompt, with_kwargs=True)]
        self.handles += [text_model.layers[layer].self_attn.register_forward_pre_hook(self._boost, with_kwargs=True)
                         for layer in layers]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _see_prompt(self, module, args, kwargs):
        """A forward over more than one new token is a prefill: its audio positions hold for the decoding after it."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None and input_ids.shape[1] > 1:
            self.audio_keys = input_ids == self.audio_token_id
        return None

    def _boost(self, module, args, kwargs):
        if self.audio_keys is None or not bool(self.audio_keys.any()):
            return None
        hidden = kwargs["hidden_states"]
        batch, queries = hidden.shape[:2]
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length(module.layer_idx) if cache is not None else 0
        keys = past + queries
        bias = _additive_mask(kwargs.get("attention_mask"), batch, queries, keys, hidden.dtype, hidden.device)
        audio = torch.zeros(batch, keys, dtype=torch.bool, device=hidden.device)
        known = min(keys, self.audio_keys.shape[1])
        audio[:, :known] = self.audio_keys[:, :known]
        bias[:, :, -1, :] += audio[:, None, :].to(bias.dtype) * self.log_strength
        return args, {**kwargs, "attention_mask": bias}


def _additive_mask(mask: torch.Tensor | None, batch: int, queries: int, keys: int, dtype, device) -> torch.Tensor:
    """The layer's mask as a float bias [batch, 1, queries, keys] (0 where attended, the dtype's minimum where not),
    whatever form the decoder passed: a float bias already, a boolean mask, or None (plain causal)."""
    lowest = torch.finfo(dtype).min
    if mask is None:
        allowed = torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)
        return torch.zeros(batch, 1, queries, keys, dtype=dtype, device=device).masked_fill(~allowed, lowest)
    mask = mask[..., :keys]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, lowest).expand(batch, 1, queries, keys).clone()
    return mask.to(dtype).expand(batch, 1, queries, keys).clone()


@contextmanager
def audio_attention_boost(thinker, layers: Sequence[int], strength: float) -> Iterator[AudioAttentionBoost]:
    boost = AudioAttentionBoost(thinker, layers, strength)
    try:
        yield boost
    finally:
        boost.remove()
