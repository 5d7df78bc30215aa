"""The tiny kit mirrors the released Qwen/Qwen3-Omni-30B-A3B-Thinking repository, and every loader works on
that layout: files and config structure, the chat template in chat_template.json only, the encoder export."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from core import qwen_omni as qo

REPO = Path(__file__).resolve().parents[1]


def files_of(folder: Path) -> set[str]:
    """File names with the shard numbers generalised, as CHECKPOINT_FILES names them."""
    return {"model-0000N-of-0000M.safetensors" if qo.SHARD_PATTERN.fullmatch(p.name) else p.name
            for p in folder.iterdir()}


def test_docs_record_the_real_file_list():
    section = (REPO / "docs" / "real_checkpoint.md").read_text().split("## The real checkpoint's files", 1)[1].split("\n#", 1)[0]
    recorded = set(re.findall(r"^\| `([^`]+)` \|", section, flags=re.M))
    assert recorded == set(qo.CHECKPOINT_FILES)


def test_miniature_has_the_real_files_and_config_structure(tiny_checkpoint):
    assert files_of(tiny_checkpoint) == set(qo.CHECKPOINT_FILES)
    shards = sorted(p.name for p in tiny_checkpoint.glob("model-*.safetensors"))
    assert len(shards) > 1 and all(f"-of-{len(shards):05d}." in s for s in shards)
    index = json.loads((tiny_checkpoint / qo.WEIGHT_INDEX).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    names = set()
    for shard in shards:
        with safe_open(str(tiny_checkpoint / shard), "pt") as f:
            names |= set(f.keys())
    assert names == set(index["weight_map"])
    assert all(n.startswith("thinker.") for n in names)
    # the checkpoint's own (per-expert) tensor format, as vLLM's loader maps it
    assert "thinker.model.layers.0.mlp.experts.0.gate_proj.weight" in names
    assert any(n.startswith("thinker.audio_tower.") for n in names) and any(n.startswith("thinker.visual.") for n in names)

    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["Qwen3OmniMoeForConditionalGeneration"]
    assert config["model_type"] == "qwen3_omni_moe" and config["enable_audio_output"] is False
    thinker = config["thinker_config"]
    assert thinker["model_type"] == "qwen3_omni_moe_thinker"
    for key in ("audio_token_id", "audio_start_token_id", "audio_end_token_id", "image_token_id", "video_token_id",
                "vision_start_token_id", "vision_end_token_id", "user_token_id", "position_id_per_seconds",
                "seconds_per_chunk", "tie_word_embeddings"):
        assert key in thinker, key
    text, audio, vision = thinker["text_config"], thinker["audio_config"], thinker["vision_config"]
    assert text["head_dim"] == 128 and text["rope_parameters"]["mrope_section"] == [24, 20, 20]
    assert text["tie_word_embeddings"] is False and text["use_qk_norm"] is True
    assert audio["num_mel_bins"] == 128 and audio["output_dim"] == text["hidden_size"]
    assert vision["apply_vit_abs_pos_embed"] is True and vision["image_size"] % vision["patch_size"] == 0

    tokenizer_config = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    assert "chat_template" not in tokenizer_config and not (tiny_checkpoint / "tokenizer.json").exists()
    for attribute, token in qo.TOKENIZER_TOKEN_ATTRIBUTES.items():
        assert tokenizer_config[attribute] == token
    assert "{%" in json.loads((tiny_checkpoint / "chat_template.json").read_text())["chat_template"]
    preprocessor = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
    assert preprocessor["processor_class"] == "Qwen3OmniMoeProcessor"
    assert (preprocessor["feature_size"], preprocessor["hop_length"], preprocessor["n_samples"]) == (128, 160, 4_800_000)
    generation = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    assert {k: generation[k] for k in ("do_sample", "temperature", "top_p", "top_k")} == {
        "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}


def test_template_is_read_from_chat_template_json(tiny_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    # as with the real checkpoint, AutoTokenizer alone finds no template ...
    assert AutoTokenizer.from_pretrained(tiny_checkpoint).chat_template is None
    # ... and every stage's loader does
    tokenizer = qo.load_tokenizer(tiny_checkpoint)
    assert qo.render_prompt(tokenizer, "Q?", ["a", "b"]).endswith("<|im_start|>assistant\n")

    bare = tmp_path / "no-template"
    shutil.copytree(tiny_checkpoint, bare)
    (bare / "chat_template.json").unlink()
    with pytest.raises(FileNotFoundError, match="chat_template.jinja, chat_template.json, tokenizer_config.json"):
        qo.load_tokenizer(bare)
    (bare / "chat_template.json").write_text('{"template": "x"}')
    with pytest.raises(ValueError, match=r"chat_template.json: chat_template"):
        qo.load_tokenizer(bare)
    (bare / "chat_template.json").unlink()
    template = json.loads((tiny_checkpoint / "chat_template.json").read_text())["chat_template"]
    (bare / "chat_template.jinja").write_text(template)  # the transformers 5 file name
    assert qo.load_tokenizer(bare).chat_template == template


def test_a_thinker_only_config_is_wrapped_into_the_composite_one(tiny_checkpoint):
    composite = json.loads((tiny_checkpoint / "config.json").read_text())
    assert qo.composite_config(composite) is composite
    wrapped = qo.composite_config({**composite["thinker_config"], "architectures": ["Qwen3OmniMoeThinkerForConditionalGeneration"]})
    assert wrapped["architectures"] == ["Qwen3OmniMoeForConditionalGeneration"] and wrapped["enable_audio_output"] is False
    assert wrapped["thinker_config"]["model_type"] == "qwen3_omni_moe_thinker"
    with pytest.raises(ValueError, match="model_type"):
        qo.composite_config({"model_type": "qwen2"})


def test_encoder_export_reads_only_the_thinker_audio_tower(tiny_checkpoint):
    from encoder.audio_encoder import load_tower, tower_state_dict

    state = tower_state_dict(tiny_checkpoint, "thinker.audio_tower.")
    assert state and not any(name.startswith(("thinker.", "audio_tower.")) for name in state)
    tower = load_tower(tiny_checkpoint)
    assert set(tower.state_dict()) == set(state)
    with pytest.raises(ValueError, match="no audio tower tensors"):
        tower_state_dict(tiny_checkpoint, "audio_tower.")  # not the composite checkpoint's prefix


def test_cogito_recipe_samples_as_qwen_advises_with_a_greedy_variant():
    from core.recipe import load_recipe
    from infer.engine import SamplingConfig, vllm_engine_kwargs

    recipe = load_recipe(REPO / "recipes" / "cogito.yaml")
    sampling = SamplingConfig.resolve(recipe.infer)  # the recipe alone, whatever the checkpoint says
    assert (sampling.do_sample, sampling.temperature, sampling.top_p, sampling.top_k, sampling.max_new_tokens) == (
        True, 0.6, 0.95, 20, 16384)
    greedy = SamplingConfig.resolve(load_recipe(REPO / "recipes" / "cogito.yaml", ["infer.do_sample=false"]).infer)
    assert not greedy.do_sample and greedy.max_new_tokens == 16384
    assert recipe.infer.max_audio_seconds is None and recipe.model.attn_implementation == "sdpa"
    assert vllm_engine_kwargs(recipe)["limit_mm_per_prompt"] == {"audio": 1, "image": 0, "video": 0}
