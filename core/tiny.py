"""A tiny, randomly initialised Qwen3-Omni thinker and an offline processor, built from configs.

`python -m core.tiny OUT_DIR` writes a miniature of the released Qwen/Qwen3-Omni-30B-A3B-Thinking
repository: the same files with the same roles (`qwen_omni.CHECKPOINT_FILES`: composite config.json,
`thinker.`-prefixed sharded safetensors, chat_template.json, preprocessor_config.json,
generation_config.json, vocab.json/merges.txt/tokenizer_config.json), the real config keys and
special tokens, and the real text attention shape (head_dim 128). Nothing downloads. Tests and the
demo run the real code paths on it in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer, WhisperFeatureExtractor
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeConfig, Qwen3OmniMoeThinkerConfig

from core import qwen_omni as qo
from core.outdir import replacing

# Qwen-style template: content lists render audio as <|audio_start|><|audio_pad|><|audio_end|>,
# and the generation prompt ends with the assistant header, as in the real Thinking checkpoint.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'audio' -%}{{- '<|audio_start|><|audio_pad|><|audio_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Text the tiny BPE is trained on: enough to give common words their own tokens.
CORPUS = [
    "system user assistant You are a multi-task audio understanding and reasoning model.",
    "Select one option from the provided choices:",
    "How many beeps are there? Which tone is higher in pitch? Which sound comes first?",
    "the first tone the second tone louder softer ascending descending noise tone beep",
    "The answer is one two three four five six. I hear a short sound, then a longer one.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}-_/\\\n",
] + [
    # The synthetic set's questions, choices, captions and reasoning (data_prep/synthetic.py): with
    # them each word is one or two tokens, so targets stay short and the tiny model learns them fast.
    "How many beeps can you hear in this clip? Is the second tone louder or softer than the first?",
    "How does the melody move? upward downward up then down. Which tone lasts longer?",
    "Describe the audio. I hear a pure tone, then a burst of noise, so the answer is a pure tone.",
    "A higher tone, then a lower tone. A lower tone, then a higher tone. A long tone, then a short tone.",
    "A faint tone, then a strong tone at the same pitch. A strong tone, then a faint tone at the same pitch.",
    "One short beep. Two short beeps. Three short beeps. Four short beeps. Five short beeps.",
    "Four notes, each one rising. Four notes, each one falling. Four notes rising, then falling at the end.",
    # The choices as the prompt lists them and as the answer after "</think>\n\n" writes them: at the
    # start of a line, with no space before. Without this line "downward" there was "d", "own", "ward",
    # while the thinking's " downward" was one token: the answer was not a copy of the thinking's
    # conclusion but a spelling of it, and held-out runs lost whole tasks on it (the thinking right,
    # the answer wrong).
    "\n".join(["one", "two", "three", "four", "five", "louder", "softer", "upward", "downward", "up then down",
               "the first tone", "the second tone", "a pure tone", "a burst of noise"]),
]

# Architecture sizes. `build_config` takes one of these (or a copy with overrides) and nothing else.
# Text attention keeps the real head_dim 128 and mrope_section (vLLM's CPU attention rejects head_dim 16).
# Hidden 128 (0.9M parameters) rather than 64: the demo's tasks are learnt in fewer steps, which more
# than pays for the wider matrices on 2 CPU cores.
TINY_SIZES = dict(
    vocab=None, hidden=128, layers=2, heads=4, kv_heads=2, head_dim=128, intermediate=128,
    moe_intermediate=64, experts=4, top_k=2, max_positions=4096, mrope_section=[24, 20, 20],
    audio_dim=32, audio_layers=2, audio_heads=2, audio_ffn=64, audio_downsample=16,
    vision_dim=32, vision_layers=1, vision_heads=2, vision_ffn=64, vision_positions=64, deepstack=[0],
    position_id_per_seconds=25,
)

# The released Qwen3-Omni-30B-A3B thinker (Thinking and Instruct share it), so benchmarks measure
# real layer shapes without a download. Sources, checked 2026 against public copies:
# - text: vocab 152064, hidden 2048, 48 layers, 32 query / 4 kv heads, head_dim 128, 128 experts top-8,
#   moe_intermediate 768 (intermediate_size 768 too, unused: every layer is MoE, mlp_only_layers []),
#   max_position_embeddings 65536, mrope_section [24, 20, 20], position_id_per_seconds 13:
#   the checkpoint's config as printed by transformers 5.7 (a public "模型信息报告" dump of
#   Qwen3-Omni-30B-A3B-Instruct) and tzhouam/vllm-omni benchmarks/qwen3-omni/transformers/
#   model_structure_output/qwen3_omni_architecture.md (Embedding(152064, 2048), 48 MoE layers);
#   keras-team/keras-hub keras_hub/src/models/qwen3_omni/qwen3_omni_presets.py (48 layers,
#   32 query / 4 kv heads, 128 experts with 8 active, 30.5B total / 3.3B activated).
# - audio encoder: d_model 1280, 32 layers, 20 heads, ffn 5120, output_dim 2048, downsample_hidden_size
#   480 (n_window 50, n_window_infer 800, max_source_positions 1500, conv_chunksize 500 are the
#   config-class defaults and the released values): the same config dump, and the defaults of
#   transformers 5.19.0 Qwen3OmniMoeAudioEncoderConfig (whose output_dim default, 3584, is NOT the 30B's; 5.20.2 the same).
# - vision encoder: depth 27, hidden 1152, 16 heads, ffn 4304, 2304 position embeddings, deepstack
#   [8, 16, 24], out_hidden_size 2048: the same config dump.
REAL_SIZES = dict(
    vocab=152064, hidden=2048, layers=48, heads=32, kv_heads=4, head_dim=128, intermediate=768,
    moe_intermediate=768, experts=128, top_k=8, max_positions=65536, mrope_section=[24, 20, 20],
    audio_dim=1280, audio_layers=32, audio_heads=20, audio_ffn=5120, audio_downsample=480,
    vision_dim=1152, vision_layers=27, vision_heads=16, vision_ffn=4304, vision_positions=2304,
    deepstack=[8, 16, 24], position_id_per_seconds=13,
)

# Special-token ids of the real tokenizer (same config dump; <|endoftext|> is Qwen's pad id),
# used when no tokenizer is given. Keys are tokens, "user" is the plain word's id.
REAL_TOKEN_IDS = {
    qo.ENDOFTEXT: 151643, qo.IM_END: 151645, qo.AUDIO_PAD: 151675, qo.AUDIO_START: 151669,
    qo.IMAGE_PAD: 151655, qo.VIDEO_PAD: 151656, qo.VISION_START: 151652, "user": 872,
}


def build_tokenizer(vocab_size: int = 1000) -> Qwen2Tokenizer:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(CORPUS * 20, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=state["vocab"], merges=merges, unk_token=None,
        eos_token=qo.IM_END, pad_token=qo.ENDOFTEXT, bos_token=None,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": qo.SPECIAL_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(tokenizer=None, sizes: dict = TINY_SIZES, **overrides) -> Qwen3OmniMoeThinkerConfig:
    """Thinker config of the given sizes; keyword overrides replace single sizes (`layers=1`).

    With a tokenizer, special-token ids come from it and the vocabulary is at least its length;
    without one (benchmarks of real shapes), the real ids and `sizes["vocab"]` are used.
    """
    unknown = set(overrides) - set(sizes)
    if unknown:
        raise KeyError(f"unknown sizes {sorted(unknown)}; known: {sorted(sizes)}")
    sizes = {**sizes, **overrides}
    if tokenizer is None:
        if sizes["vocab"] is None:
            raise ValueError("without a tokenizer the sizes must give the vocabulary size")
        ids = REAL_TOKEN_IDS
        vocab_size = sizes["vocab"]
    else:
        ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in REAL_TOKEN_IDS}
        ids["user"] = ids["user"] or 0
        vocab_size = max(sizes["vocab"] or 0, len(tokenizer))
    if max(ids.values()) >= vocab_size:
        raise ValueError(f"special-token ids up to {max(ids.values())} do not fit a vocabulary of {vocab_size}")
    if sum(sizes["mrope_section"]) != sizes["head_dim"] // 2:
        raise ValueError(f"mrope_section {sizes['mrope_section']} must sum to head_dim / 2")
    text_config = dict(
        vocab_size=vocab_size, hidden_size=sizes["hidden"], intermediate_size=sizes["intermediate"],
        num_hidden_layers=sizes["layers"], num_attention_heads=sizes["heads"],
        num_key_value_heads=sizes["kv_heads"], head_dim=sizes["head_dim"],
        moe_intermediate_size=sizes["moe_intermediate"], num_experts=sizes["experts"],
        num_experts_per_tok=sizes["top_k"], max_position_embeddings=sizes["max_positions"],
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": sizes["mrope_section"],
                         "interleaved": True, "mrope_interleaved": True},
        pad_token_id=ids[qo.ENDOFTEXT], eos_token_id=ids[qo.IM_END],
    )
    audio_config = dict(
        num_mel_bins=128, encoder_layers=sizes["audio_layers"], encoder_attention_heads=sizes["audio_heads"],
        encoder_ffn_dim=sizes["audio_ffn"], d_model=sizes["audio_dim"], output_dim=sizes["hidden"],
        downsample_hidden_size=sizes["audio_downsample"], max_source_positions=1500,
    )
    vision_config = dict(
        depth=sizes["vision_layers"], hidden_size=sizes["vision_dim"], intermediate_size=sizes["vision_ffn"],
        num_heads=sizes["vision_heads"], out_hidden_size=sizes["hidden"],
        num_position_embeddings=sizes["vision_positions"],
        # fewer layers than the real tower: keep only the deepstack taps that still exist
        deepstack_visual_indexes=[i for i in sizes["deepstack"] if i < sizes["vision_layers"]],
    )
    return Qwen3OmniMoeThinkerConfig(
        text_config=text_config, audio_config=audio_config, vision_config=vision_config,
        audio_token_id=ids[qo.AUDIO_PAD], audio_start_token_id=ids[qo.AUDIO_START],
        image_token_id=ids[qo.IMAGE_PAD], video_token_id=ids[qo.VIDEO_PAD],
        vision_start_token_id=ids[qo.VISION_START], user_token_id=ids["user"],
        position_id_per_seconds=sizes["position_id_per_seconds"],
    )


def build_thinker(config: Qwen3OmniMoeThinkerConfig, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0):
    """A randomly initialised thinker, allocated directly on `device` in `dtype`.

    No float32 CPU copy is made first, so a real-shaped thinker on a GPU costs only its bf16 size.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        return qo.thinker_class()._from_config(config, dtype=dtype)


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a thinker, from its config alone (nothing is allocated)."""

    total: int
    text: int  # embedding + decoder layers + final norm + lm_head
    audio: int
    vision: int
    embedding: int
    experts: int  # all routed experts of all layers
    text_layer: tuple[int, ...]  # per decoder layer
    active_per_token: int  # what one text token multiplies through: see parameter_counts

    def training_flops_per_token(self) -> int:
        """6 * active parameters (forward 2, backward 4); attention's sequence-length term is left out."""
        return 6 * self.active_per_token


def parameter_counts(config: Qwen3OmniMoeThinkerConfig) -> ParameterCounts:
    """Exact parameter counts of `thinker_class()(config)` by formula, for MFU and memory estimates.

    `active_per_token` counts the weights one text token is multiplied with: attention, norms,
    router, its top-k experts and the lm_head; not the input embedding (a lookup) and not the
    audio/vision towers (they run per audio frame / image patch, not per token).
    """
    t, a, v = config.text_config, config.audio_config, config.vision_config
    hidden, head_dim = t.hidden_size, t.head_dim
    embedding = t.vocab_size * hidden
    lm_head = 0 if config.tie_word_embeddings else t.vocab_size * hidden
    attention = hidden * head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads) + 2 * head_dim
    expert = 3 * t.moe_intermediate_size * hidden  # gate, up and down projections of one expert
    layers, active_layers, experts = [], [], 0
    for idx in range(t.num_hidden_layers):
        common = attention + 2 * hidden  # + input and post-attention RMSNorm
        if idx not in (t.mlp_only_layers or []) and t.num_experts > 0 and (idx + 1) % t.decoder_sparse_step == 0:
            router = t.num_experts * hidden
            layers.append(common + router + t.num_experts * expert)
            active_layers.append(common + router + t.num_experts_per_tok * expert)
            experts += t.num_experts * expert
        else:
            layers.append(common + 3 * hidden * t.intermediate_size)
            active_layers.append(layers[-1])
    text = embedding + sum(layers) + hidden + lm_head

    d, ffn, conv = a.d_model, a.encoder_ffn_dim, a.downsample_hidden_size
    freq = a.num_mel_bins
    for _ in range(3):  # three stride-2 convolutions over the mel axis
        freq = (freq + 1) // 2
    audio_layer = 4 * (d * d + d) + 2 * d + (d * ffn + ffn) + (ffn * d + d) + 2 * d
    audio = (
        a.encoder_layers * audio_layer
        + (9 * conv + conv) + 2 * (9 * conv * conv + conv)  # conv2d1..3
        + conv * freq * d  # conv_out, no bias
        + 2 * d  # ln_post
        + (d * d + d) + (d * a.output_dim + a.output_dim)  # proj1, proj2
    )

    h, f = v.hidden_size, v.intermediate_size
    merged = h * v.spatial_merge_size**2
    merger_mlp = (merged * merged + merged) + (merged * v.out_hidden_size + v.out_hidden_size)
    vision_block = 2 * (2 * h) + (h * 3 * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
    vision = (
        v.in_channels * h * v.temporal_patch_size * v.patch_size**2 + h  # patch embedding (Conv3d)
        + v.num_position_embeddings * h
        + v.depth * vision_block
        + (2 * h + merger_mlp)  # final merger
        + len(v.deepstack_visual_indexes) * (2 * merged + merger_mlp)  # deepstack mergers
    )
    return ParameterCounts(
        total=text + audio + vision, text=text, audio=audio, vision=vision, embedding=embedding,
        experts=experts, text_layer=tuple(layers), active_per_token=sum(active_layers) + hidden + lm_head,
    )


def make_audio_tower_responsive(tower: torch.nn.Module) -> None:
    """Fan-in scaled weights for the tiny audio tower.

    With the config's std-0.02 init the tower's output hardly depends on the audio (different
    clips come out ~1e-7 apart), so the tiny model could not learn from sound and padding leaks
    would pass any tolerance. Scaling by fan-in keeps activations O(1) through the tower.
    """
    with torch.no_grad():
        for module in tower.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.normal_(module.weight, std=module.weight[0].numel() ** -0.5)
                if module.bias is not None:
                    torch.nn.init.normal_(module.bias, std=0.1)


# Keys of the released config.json that transformers 5.19.0's config classes (and 5.20.2's) no longer write but
# vLLM reads (the thinker_config of Qwen3-Omni-30B-A3B as saved by transformers 5.7; see
# docs/real_checkpoint.md). Values that depend on the sizes are filled in by `composite_config_dict`.
REAL_CONFIG_KEYS = {
    "top": {"im_start_token_id": qo.IM_START, "im_end_token_id": qo.IM_END},
    "thinker": {"audio_end_token_id": qo.AUDIO_END, "vision_end_token_id": qo.VISION_END, "seconds_per_chunk": 2,
                "tie_word_embeddings": False},
    "text": {"tie_word_embeddings": False, "use_qk_norm": True, "shared_expert_intermediate_size": 0},
    "vision": {"apply_vit_abs_pos_embed": True, "in_chans": 3, "tokens_per_second": 2},
}

# preprocessor_config.json of the released checkpoint: the Whisper feature extractor's settings (128
# bins, 300 s of n_samples, no truncation), the image processor's, and the processor class.
PREPROCESSOR_CONFIG = {
    "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128, "hop_length": qo.HOP_LENGTH,
    "n_fft": 400, "n_samples": 4_800_000, "nb_max_frames": 30_000, "sampling_rate": qo.SAMPLE_RATE,
    "chunk_length": 300, "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True,
    "dither": 0.0, "image_processor_type": "Qwen2VLImageProcessor", "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "min_pixels": 3136, "max_pixels": 12_845_056,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3OmniMoeProcessor",
}

# generation_config.json: Qwen's published sampling for the Thinking model; ends at <|im_end|> or <|endoftext|>.
GENERATION_CONFIG = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}

TINY_SHARDS = 3  # the real checkpoint is sharded; so is the miniature (its index is exercised)


def composite_config_dict(thinker_config: Qwen3OmniMoeThinkerConfig, tokenizer) -> dict:
    """config.json as the real checkpoint has it: the composite config, no audio output (the Thinking
    model has no talker), the real keys of `REAL_CONFIG_KEYS`, token ids from `tokenizer`."""
    config = Qwen3OmniMoeConfig(thinker_config=thinker_config.to_dict(), enable_audio_output=False).to_dict()
    config["architectures"] = ["Qwen3OmniMoeForConditionalGeneration"]
    ids = lambda values: {k: tokenizer.convert_tokens_to_ids(v) if isinstance(v, str) else v for k, v in values.items()}  # noqa: E731
    config.update(ids(REAL_CONFIG_KEYS["top"]))
    thinker = config["thinker_config"]
    thinker.update(ids(REAL_CONFIG_KEYS["thinker"]))
    thinker["text_config"].update(REAL_CONFIG_KEYS["text"])
    vision = thinker["vision_config"]
    side = int(vision["num_position_embeddings"] ** 0.5)  # position grid side; the real 48 x 16 px = 768
    vision.update(REAL_CONFIG_KEYS["vision"], image_size=side * vision["patch_size"], spatial_patch_size=vision["patch_size"])
    return config


def write_tokenizer_files(tokenizer, out: Path) -> None:
    """vocab.json, merges.txt and tokenizer_config.json as the real checkpoint ships them: no
    tokenizer.json, no chat template, and the token attributes the stock processor reads."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    (out / "vocab.json").write_text(json.dumps(state["model"]["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    added = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in state["added_tokens"]
    }
    config = {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": qo.SPECIAL_TOKENS, **qo.TOKENIZER_TOKEN_ATTRIBUTES,
        "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": qo.IM_END, "errors": "replace",
        "model_max_length": 131072, "pad_token": qo.ENDOFTEXT, "processor_class": "Qwen3OmniMoeProcessor",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def write_processor_files(tokenizer, out: Path) -> None:
    """chat_template.json, preprocessor_config.json and generation_config.json of the real checkpoint."""
    write_json = lambda name, obj: (out / name).write_text(json.dumps(obj, indent=2) + "\n")  # noqa: E731
    write_json("chat_template.json", {"chat_template": CHAT_TEMPLATE})
    write_json("preprocessor_config.json", PREPROCESSOR_CONFIG)
    end_ids = [tokenizer.convert_tokens_to_ids(t) for t in (qo.IM_END, qo.ENDOFTEXT)]
    write_json("generation_config.json", {
        **GENERATION_CONFIG, "eos_token_id": end_ids, "pad_token_id": end_ids[1],
    })


def build_tiny_checkpoint(out_dir: str | Path, seed: int = 0, pretrain: str | Path | None = None) -> Path:
    """Write the miniature of the real checkpoint (see the module docstring) to `out_dir` and return it.

    With `pretrain` (a JSONL of captioned clips), the base is first pre-trained to hear (core/tiny_pretrain.py),
    on every rank when launched by `accelerate launch`; rank 0 then writes the checkpoint.
    """
    tokenizer = build_tokenizer()
    config = build_config(tokenizer)
    model = build_thinker(config, seed=seed)
    make_audio_tower_responsive(model.audio_tower)
    if pretrain is None:
        return write_checkpoint(model, config, tokenizer, out_dir)
    from accelerate import PartialState

    from core.tiny_pretrain import pretrain_to_hear

    pretrain_to_hear(model, qo.OmniProcessor(tokenizer, tiny_feature_extractor()), pretrain, seed=seed)
    state = PartialState()
    if state.is_main_process:
        write_checkpoint(model, config, tokenizer, out_dir)
    state.wait_for_everyone()  # every rank returns a written checkpoint
    return Path(out_dir)


def write_checkpoint(model, config: Qwen3OmniMoeThinkerConfig, tokenizer, out_dir: str | Path) -> Path:
    """The model and its tokenizer and processor files, in the real repository's layout: built beside
    `out_dir` and swapped in whole (`make tiny` is done once config.json is there, so it must come with the
    rest). An existing `out_dir` is replaced only when empty or a tiny checkpoint of this configuration."""
    composite = composite_config_dict(config, tokenizer)
    written = json.loads(json.dumps(qo.composite_config(composite)))  # config.json as save_thinker writes it

    def tiny_of_this_config(folder: Path) -> bool:
        names = {"model-0000N-of-0000M.safetensors" if qo.SHARD_PATTERN.fullmatch(p.name) else p.name for p in folder.iterdir()}
        config_file = folder / "config.json"
        return names <= set(qo.CHECKPOINT_FILES) and (not config_file.is_file() or json.loads(config_file.read_text()) == written)

    out = Path(out_dir)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with replacing(out, "core.tiny", made=tiny_of_this_config, marker=False) as staging:
        qo.save_thinker(model, staging, composite, max_shard_size=size // TINY_SHARDS + 1)
        write_tokenizer_files(tokenizer, staging)
        write_processor_files(tokenizer, staging)
    return out


def tiny_feature_extractor() -> WhisperFeatureExtractor:
    """The feature extractor the checkpoint's preprocessor_config.json gives `OmniProcessor.from_pretrained`."""
    return WhisperFeatureExtractor(**PREPROCESSOR_CONFIG)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="artifacts/tiny-omni")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain", metavar="JSONL", help="captioned clips to pre-train the base on, so it hears "
                        "(data_prep.synthetic's pretrain.jsonl; under `accelerate launch` on every rank); "
                        "without it the weights stay random")
    args = parser.parse_args()
    out = build_tiny_checkpoint(args.out_dir, args.seed, args.pretrain)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"tiny Qwen3-Omni checkpoint (the real repository's layout) written to {out}")


if __name__ == "__main__":
    main()
