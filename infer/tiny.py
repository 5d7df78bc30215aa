"""A tiny, randomly initialised Qwen3-Omni thinker and an offline processor, built from configs.

`python -m infer.tiny OUT_DIR` writes a folder that loads with `from_pretrained` exactly like a
real checkpoint (same classes, same special tokens, a Qwen-style chat template). Nothing downloads.
Tests and the demo run the real code paths on it in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import GenerationConfig, Qwen2Tokenizer, WhisperFeatureExtractor
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig

from infer import qwen_omni as qo

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
]

TINY_SIZES = dict(hidden=64, layers=2, heads=4, kv_heads=2, experts=4, top_k=2, audio_dim=32, audio_layers=2)


def build_tokenizer(vocab_size: int = 400) -> Qwen2Tokenizer:
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


def build_config(tokenizer, sizes: dict = TINY_SIZES) -> Qwen3OmniMoeThinkerConfig:
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in qo.SPECIAL_TOKENS}
    head_dim = sizes["hidden"] // sizes["heads"]
    half = head_dim // 2
    mrope_section = [half - 2 * (half // 3), half // 3, half // 3]  # must sum to head_dim / 2
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=sizes["hidden"], intermediate_size=2 * sizes["hidden"],
        num_hidden_layers=sizes["layers"], num_attention_heads=sizes["heads"],
        num_key_value_heads=sizes["kv_heads"], head_dim=head_dim, moe_intermediate_size=sizes["hidden"] // 2,
        num_experts=sizes["experts"], num_experts_per_tok=sizes["top_k"], max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope_section,
                         "interleaved": True, "mrope_interleaved": True},
        pad_token_id=ids[qo.ENDOFTEXT], eos_token_id=ids[qo.IM_END],
    )
    audio_config = dict(
        num_mel_bins=128, encoder_layers=sizes["audio_layers"], encoder_attention_heads=2,
        encoder_ffn_dim=2 * sizes["audio_dim"], d_model=sizes["audio_dim"], output_dim=sizes["hidden"],
        downsample_hidden_size=16, max_source_positions=1500,
    )
    vision_config = dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=sizes["hidden"],
        num_position_embeddings=64, deepstack_visual_indexes=[0],
    )
    return Qwen3OmniMoeThinkerConfig(
        text_config=text_config, audio_config=audio_config, vision_config=vision_config,
        audio_token_id=ids[qo.AUDIO_PAD], audio_start_token_id=ids[qo.AUDIO_START],
        image_token_id=ids[qo.IMAGE_PAD], video_token_id=ids[qo.VIDEO_PAD],
        vision_start_token_id=ids[qo.VISION_START],
        user_token_id=tokenizer.convert_tokens_to_ids("user") or 0,
    )


def build_tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny thinker checkpoint + processor files to `out_dir` and return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = build_config(tokenizer)
    torch.manual_seed(seed)
    model = qo.thinker_class()(config)
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=64,
        eos_token_id=[tokenizer.convert_tokens_to_ids(qo.IM_END), tokenizer.convert_tokens_to_ids(qo.ENDOFTEXT)],
        pad_token_id=tokenizer.convert_tokens_to_ids(qo.ENDOFTEXT),
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=128, sampling_rate=qo.SAMPLE_RATE).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="artifacts/tiny-omni")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = build_tiny_checkpoint(args.out_dir, args.seed)
    print(f"tiny Qwen3-Omni thinker written to {out}")


if __name__ == "__main__":
    main()
