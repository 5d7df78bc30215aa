"""The audio-attention boost (MATA): on a chosen layer the last query token's attention to audio keys rises by
exactly the set factor relative to every other key; nothing else changes, and nothing at all when it is off."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core import qwen_omni as qo

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STRENGTH = 3.0


@pytest.fixture(scope="module")
def inputs(processor):
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(16_000).astype(np.float32) * 0.1, rng.standard_normal(24_000).astype(np.float32) * 0.1]
    prompts = [qo.render_prompt(processor.tokenizer, q, ["one", "two", "three"]) for q in ("How many beeps?", "Which tone is lowest?")]
    return processor(prompts, clips, padding_side="left")  # left padding: the rows' audio sits at different positions


def thinker(tiny_checkpoint, attn):
    return qo.load_thinker(tiny_checkpoint, "float32", attn_implementation=attn).eval()


def attention_weights(model, inputs) -> list[torch.Tensor]:
    """Every layer's attention probabilities [batch, heads, queries, keys] (eager attention returns them)."""
    seen = []
    handles = [layer.self_attn.register_forward_hook(lambda m, a, out: seen.append(out[1].detach()))
               for layer in model.model.layers]
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    return seen


def test_boost_multiplies_the_last_query_tokens_audio_attention_by_the_factor(tiny_checkpoint, inputs):
    model = thinker(tiny_checkpoint, "eager")
    off = attention_weights(model, inputs)
    with qo.audio_attention_boost(model, layers=[1], strength=STRENGTH):
        on = attention_weights(model, inputs)
    audio = inputs["input_ids"] == model.config.audio_token_id
    attended = inputs["attention_mask"].bool()
    assert audio.sum(-1).min() > 0
    torch.testing.assert_close(on[0], off[0], rtol=0, atol=0)  # a layer before the boosted one: untouched
    torch.testing.assert_close(on[1][:, :, :-1], off[1][:, :, :-1], rtol=0, atol=0)  # other query rows: untouched
    for row in range(audio.shape[0]):
        text = attended[row] & ~audio[row]
        last_on, last_off = on[1][row, :, -1], off[1][row, :, -1]
        odds_on = last_on[:, audio[row]].sum(-1) / last_on[:, text].sum(-1)
        odds_off = last_off[:, audio[row]].sum(-1) / last_off[:, text].sum(-1)
        torch.testing.assert_close(odds_on / odds_off, torch.full_like(odds_on, STRENGTH), rtol=1e-4, atol=0)
        # within each group the shares are unchanged: the boost is one factor on all audio keys
        torch.testing.assert_close(last_on[:, audio[row]] / last_on[:, audio[row]].sum(-1, keepdim=True),
                                   last_off[:, audio[row]] / last_off[:, audio[row]].sum(-1, keepdim=True), rtol=1e-4, atol=1e-7)
        assert float(last_on[:, ~attended[row]].abs().sum()) < 1e-6  # padding stays masked
    assert (~attended).any()  # ... and there is some: the rows' audio sits at different positions


def test_removed_boost_and_unit_strength_leave_the_logits_unchanged(tiny_checkpoint, inputs):
    model = thinker(tiny_checkpoint, "sdpa")
    with torch.no_grad():
        before = model(**inputs).logits
        with qo.audio_attention_boost(model, layers=[0, 1], strength=1.0):
            unit = model(**inputs).logits
        with qo.audio_attention_boost(model, layers=[0, 1], strength=STRENGTH):
            boosted = model(**inputs).logits
        after = model(**inputs).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    real = inputs["attention_mask"].bool()  # left-padding positions' outputs are never used: compared where it matters
    torch.testing.assert_close(unit[real], before[real], rtol=1e-5, atol=1e-5)
    assert float((boosted[:, -1] - before[:, -1]).abs().max()) > 1e-3  # the last position moves ...
    real[:, -1] = False
    torch.testing.assert_close(boosted[real], before[real], rtol=1e-5, atol=1e-5)  # ... and only it


def test_sdpa_and_eager_boost_agree(tiny_checkpoint, inputs):
    """The bias is built from whatever mask the decoder passes (None under SDPA's causal path, a float one in eager)."""
    logits = {}
    for attn in ("eager", "sdpa"):
        model = thinker(tiny_checkpoint, attn)
        with torch.no_grad(), qo.audio_attention_boost(model, layers=[1], strength=STRENGTH):
            logits[attn] = model(**inputs).logits[:, -1]
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-4, atol=1e-4)


def test_decoding_steps_get_the_bias_on_the_prompts_audio_keys(tiny_checkpoint, processor, inputs):
    model = thinker(tiny_checkpoint, "sdpa")
    masks = []
    with qo.audio_attention_boost(model, layers=[1], strength=STRENGTH) as boost:
        hook = model.model.layers[1].self_attn.register_forward_pre_hook(
            lambda m, a, kw: masks.append(kw["attention_mask"]), with_kwargs=True)  # runs after the boost's hook
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                           pad_token_id=processor.tokenizer.pad_token_id)
        hook.remove()
        audio = boost.audio_keys
    assert len(masks) == 3 and all(mask.shape[2] == 1 for mask in masks[1:])  # prefill, then one query per step
    for step, mask in enumerate(masks[1:], 1):
        keys = audio.shape[1] + step
        assert mask.shape[-1] == keys
        boosted = mask[:, 0, -1, : audio.shape[1]][audio]
        torch.testing.assert_close(boosted, torch.full_like(boosted, math.log(STRENGTH)))
        assert float(mask[:, 0, -1, audio.shape[1]:].abs().max()) == 0  # generated keys: no bias


def test_boost_refuses_bad_layers_and_flash_attention(tiny_checkpoint):
    model = thinker(tiny_checkpoint, "sdpa")
    with pytest.raises(ValueError, match=r"infer.mata.layers: \[5\] out of range"):
        qo.AudioAttentionBoost(model, [5], STRENGTH)
    model.model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="infer.mata: needs model.attn_implementation"):
        qo.AudioAttentionBoost(model, [1], STRENGTH)
