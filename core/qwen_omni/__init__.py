"""Everything specific to Qwen3-Omni, in one place: `from core import qwen_omni as qo`, then `qo.X`.

Training, inference, data preparation and evaluation all build prompts, tokenise audio and load
the thinker through this package, so the prompt seen at training time cannot drift from the one
seen at inference time. Facts and where they were verified: docs/real_checkpoint.md.

One module per job, each importing only the ones listed before it:
- model: the thinker's transformers classes (imported on first use), parameter counts, context length;
- chat: special tokens, prompt systems, rendering prompts and SFT targets, end-of-generation tokens;
- checkpoint: the released checkpoint's files, loading the thinker and tokenizer, saving in that layout;
- processor: the waveform-to-features rule, audio token counts, OmniProcessor (model inputs, padding);
- lora_targets: the text layers, the exact LoRA module names and the fused expert parameters;
- attention: the audio-attention boost (MATA) on the thinker's decoder layers.
Loading under DeepSpeed ZeRO-3 is training's own: train/zero3.py.
"""

from core.qwen_omni.attention import AudioAttentionBoost, audio_attention_boost  # noqa: F401
from core.qwen_omni.chat import (  # noqa: F401
    AUDIO_END,
    AUDIO_PAD,
    AUDIO_START,
    ENDOFTEXT,
    IM_END,
    IM_START,
    IMAGE_PAD,
    PROMPT_SYSTEMS,
    SPECIAL_TOKENS,
    THINK_BUDGET_CLOSE,
    THINK_CLOSE,
    THINK_OPEN,
    TOKENIZER_TOKEN_ATTRIBUTES,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    build_messages,
    chat_messages,
    eos_token_ids,
    prompt_system,
    question_text,
    render_chat,
    render_prompt,
    render_target,
)
from core.qwen_omni.checkpoint import (  # noqa: F401
    ADAPTER_WEIGHTS,
    CHAT_TEMPLATE_FILES,
    CHECKPOINT_FILES,
    OTHER_SUBMODELS,
    SHARD_PATTERN,
    THINKER_PREFIX,
    WEIGHT_INDEX,
    CheckpointError,
    CheckpointNotFound,
    check_weight_file,
    checkpoint_source,
    checkpoint_tensors,
    composite_config,
    copy_checkpoint_files,
    load_adapter,
    load_thinker,
    load_tokenizer,
    save_thinker,
    shard_files,
    weight_files,
)
from core.qwen_omni.lora_targets import (  # noqa: F401
    ATTENTION_PROJECTIONS,
    EXPERT_PARAMETERS,
    NON_TEXT_MODULES,
    expert_parameter_names,
    lora_target_names,
    text_layers,
)
from core.qwen_omni.model import (  # noqa: F401
    audio_tower_class,
    context_length,
    full_numel,
    modeling_module,
    moe_block_class,
    thinker_class,
)
from core.qwen_omni.processor import (  # noqa: F401
    HOP_LENGTH,
    IGNORE_INDEX,
    SAMPLE_RATE,
    OmniProcessor,
    align_to_hop,
    audio_token_count,
    feature_frames,
    pad_features,
    pad_sequences,
)
