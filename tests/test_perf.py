"""Fast paths of issue 8: the real-shaped config, the MoE experts implementations, per-clip features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core import qwen_omni as qo
from core.recipe import RecipeError, load_recipe
from core.tiny import REAL_SIZES, TINY_SIZES, build_config, build_thinker, parameter_counts


def meta_thinker(config):
    with torch.device("meta"):  # shapes only, no memory
        return qo.thinker_class()(config)


def counted(model, keep=lambda name: True) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if keep(name))


def test_real_config_has_the_released_shapes():
    config = build_config(sizes=REAL_SIZES, layers=1, audio_layers=1, vision_layers=1)
    model = meta_thinker(config)
    layer = qo.text_layers(model)[0]
    assert layer.self_attn.q_proj.weight.shape == (32 * 128, 2048)
    assert layer.self_attn.k_proj.weight.shape == (4 * 128, 2048)
    assert layer.mlp.experts.gate_up_proj.shape == (128, 2 * 768, 2048)
    assert layer.mlp.experts.down_proj.shape == (128, 2048, 768)
    assert model.model.embed_tokens.weight.shape == (152064, 2048)
    assert model.lm_head.weight.shape == (152064, 2048)
    assert model.audio_tower.proj2.weight.shape == (2048, 1280)
    assert model.audio_tower.layers[0].fc1.weight.shape == (5120, 1280)
    assert config.text_config.num_experts_per_tok == 8 and config.audio_config.encoder_attention_heads == 20
    # one layer, by hand: q/k/v/o + q/k norms + 2 RMSNorms + router + 128 experts x (gate, up, down)
    by_hand = 2048 * 128 * (2 * 32 + 2 * 4) + 2 * 128 + 2 * 2048 + 128 * 2048 + 128 * 3 * 768 * 2048
    assert counted(layer) == by_hand == parameter_counts(config).text_layer[0]


@pytest.mark.parametrize("sizes, overrides", [
    (REAL_SIZES, dict(layers=1, audio_layers=1, vision_layers=1)),
    (REAL_SIZES, dict(layers=2, audio_layers=2, vision_layers=9)),  # keeps deepstack tap 8
    (TINY_SIZES, {}),
])
def test_parameter_counts_match_the_instantiated_model(sizes, overrides, processor):
    tokenizer = None if sizes is REAL_SIZES else processor.tokenizer
    config = build_config(tokenizer, sizes, **overrides)
    model = meta_thinker(config)
    counts = parameter_counts(config)
    assert counts.total == counted(model)
    assert counts.audio == counted(model.audio_tower)
    assert counts.vision == counted(model.visual)
    assert counts.experts == counted(model, lambda n: ".experts." in n)
    assert counts.text == counts.total - counts.audio - counts.vision


def test_full_real_thinker_counts_agree_with_the_published_sizes():
    counts = parameter_counts(build_config(sizes=REAL_SIZES))  # formula only: nothing is allocated
    assert 30.4e9 < counts.text < 30.6e9  # "30.5B total"
    assert 3.3e9 < counts.active_per_token + counts.embedding < 3.4e9  # "3.3B activated" (with embeddings)
    assert counts.training_flops_per_token() == 6 * counts.active_per_token


def test_builder_checks_its_sizes():
    with pytest.raises(KeyError, match="unknown sizes"):
        build_config(sizes=REAL_SIZES, layer=1)
    with pytest.raises(ValueError, match="vocabulary"):
        build_config(sizes=TINY_SIZES)  # no tokenizer and no vocabulary size
    with pytest.raises(ValueError, match="mrope_section"):
        build_config(sizes=REAL_SIZES, head_dim=64)


def test_thinker_is_built_in_the_requested_dtype(processor):
    model = build_thinker(build_config(processor.tokenizer), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# --- MoE experts implementations -------------------------------------------------------------


def moe_output_and_grads(model, impl, hidden, upstream):
    model.set_experts_implementation(impl)
    block = next(m for m in model.modules() if isinstance(m, qo.moe_block_class()))
    block.zero_grad(set_to_none=True)
    x = hidden.clone().requires_grad_(True)
    out = block(x)
    (out * upstream).sum().backward()
    grads = {name: p.grad.clone() for name, p in block.named_parameters()}
    return out.detach(), x.grad, grads


def test_experts_implementations_agree(tiny_checkpoint):
    model = qo.load_thinker(tiny_checkpoint, dtype="float32")
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, model.config.text_config.hidden_size)
    upstream = torch.randn_like(hidden)
    out, dx, grads = moe_output_and_grads(model, "eager", hidden, upstream)
    assert grads["experts.gate_up_proj"].abs().sum() > 0 and grads["gate.weight"].abs().sum() > 0
    for impl in ("grouped_mm", "batched_mm"):
        other_out, other_dx, other_grads = moe_output_and_grads(model, impl, hidden, upstream)
        assert torch.allclose(other_out, out, atol=1e-5), impl
        assert torch.allclose(other_dx, dx, atol=1e-5), impl
        for name, grad in grads.items():
            assert torch.allclose(other_grads[name], grad, atol=1e-5), (impl, name)


def test_load_thinker_and_recipe_take_the_experts_implementation(tiny_checkpoint):
    model = qo.load_thinker(tiny_checkpoint, dtype="float32", experts_implementation="eager")
    assert model.config.text_config._experts_implementation == "eager"
    default = qo.load_thinker(tiny_checkpoint, dtype="float32")
    assert default.config.text_config._experts_implementation == "grouped_mm"  # transformers' default
    assert load_recipe(None, ["model.experts_implementation=batched_mm"]).model.experts_implementation == "batched_mm"
    assert load_recipe(None).model.experts_implementation is None
    with pytest.raises(RecipeError, match="experts_implementation"):
        load_recipe(None, ["model.experts_implementation=loop"])


# --- per-clip features -----------------------------------------------------------------------


def clips(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


def test_precomputed_features_give_the_waveform_batch(processor):
    audios = clips([16_000, 24_123, 8_050, 31_999])  # lengths that are and are not multiples of the hop
    prompt = qo.render_prompt(processor.tokenizer, "Which?", ["x", "y"])
    from_waves = processor([prompt] * 4, audios)
    from_features = processor([prompt] * 4, features=[processor.clip_features(a) for a in audios])
    assert from_waves.keys() == from_features.keys()
    for key in from_waves:
        assert torch.allclose(from_waves[key].float(), from_features[key].float(), atol=1e-6), key
    assert from_waves["feature_attention_mask"].sum(-1).tolist() == [100, 151, 51, 200]  # ceil(n / 160): hop-aligned


def test_a_clip_gets_the_same_features_in_any_batch(processor):
    short, long = clips([8_050, 40_000])
    alone = processor.audio_features([short])
    batched = processor.audio_features([short, long])
    frames = int(alone["feature_attention_mask"].sum())
    assert int(batched["feature_attention_mask"][0].sum()) == frames == 51  # ceil(8050 / 160)
    assert torch.equal(batched["input_features"][0, :, :frames], alone["input_features"][0])


def test_processor_needs_exactly_one_audio_source(processor):
    with pytest.raises(ValueError, match="exactly one"):
        processor.audio_features()
    with pytest.raises(ValueError, match="same length"):
        processor(["p", "q"], features=[processor.clip_features(clips([1600])[0])])


def test_engine_loads_the_recipes_experts_implementation(tiny_checkpoint):
    from infer.engine import load_engine

    recipe = load_recipe(None, [f"model.path={tiny_checkpoint}", "model.experts_implementation=eager", "infer.adapter=null"])
    assert load_engine(recipe, device="cpu").model.config.text_config._experts_implementation == "eager"


def test_train_bench_measures_the_real_step(tiny_checkpoint, synthetic_dir):
    from bench.train_bench import Row, measure

    common = dict(model="tiny", checkpoint=str(tiny_checkpoint), train_jsonl=str(synthetic_dir / "train.jsonl"),
                  device="cpu", dtype="float32", batch_size=4, steps=2, warmup=0, passes=1, gradient_checkpointing=False)
    grouped, plain = (measure(Row(**common, group_by_length=g)) for g in (True, False))
    for result in (grouped, plain):
        assert result["samples"] == 8 and 0 < result["target_tokens"] < result["tokens"] <= result["padded_tokens"]
        assert result["achieved_flops"] > 0 and result["peak_gib"] > 0
    waste = lambda r: 1 - r["tokens"] / r["padded_tokens"]
    assert waste(grouped) < waste(plain)
