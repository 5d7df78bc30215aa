"""Special tokens and the chat format: every prompt and SFT target of every stage is rendered here, so
the prompt seen at training time cannot drift from the one seen at inference time."""

from __future__ import annotations

from typing import Sequence

# Special tokens of the Qwen3-Omni tokenizer. Their ids always come from the tokenizer in use.
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
AUDIO_START, AUDIO_PAD, AUDIO_END = "<|audio_start|>", "<|audio_pad|>", "<|audio_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# What a thinking budget appends when the thinking runs out of tokens: the same separator the
# model writes between its thinking and its answer (see render_target).
THINK_BUDGET_CLOSE = f"\n{THINK_CLOSE}\n\n"
ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = [
    ENDOFTEXT, IM_START, IM_END, AUDIO_START, AUDIO_END, AUDIO_PAD,
    VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, THINK_OPEN, THINK_CLOSE,
]

# Attributes the stock Qwen3OmniMoeProcessor reads from the tokenizer (tokenizer_config.json keys of the
# real checkpoint; vLLM builds that processor too).
TOKENIZER_TOKEN_ATTRIBUTES = {
    "audio_token": AUDIO_PAD, "audio_bos_token": AUDIO_START, "audio_eos_token": AUDIO_END,
    "image_token": IMAGE_PAD, "video_token": VIDEO_PAD,
    "vision_bos_token": VISION_START, "vision_eos_token": VISION_END,
}

# The challenge baseline prompt (PROTOCOL.md) and Qwen's own advice for the Thinking model.
PROMPT_SYSTEMS: dict[str, str | None] = {
    "baseline": "You are a multi-task audio understanding and reasoning model.",
    "qwen": None,
}


def question_text(question: str, choices: Sequence[str]) -> str:
    """The user's text turn: the question and the choices, as the challenge baseline writes it."""
    return question + "\nSelect one option from the provided choices:\n" + "\n".join(choices)


def prompt_system(prompt_style: str) -> str | None:
    if prompt_style not in PROMPT_SYSTEMS:
        raise ValueError(f"unknown prompt style {prompt_style!r}; known: {sorted(PROMPT_SYSTEMS)}")
    return PROMPT_SYSTEMS[prompt_style]


def chat_messages(user_text: str, system: str | None = None, with_audio: bool = True) -> list[dict]:
    """One user turn (the audio first, then the text), after an optional system turn."""
    messages = [] if system is None else [{"role": "system", "content": [{"type": "text", "text": system}]}]
    content = ([{"type": "audio"}] if with_audio else []) + [{"type": "text", "text": user_text}]
    messages.append({"role": "user", "content": content})
    return messages


def render_chat(tokenizer, user_text: str, system: str | None = None, with_audio: bool = True) -> str:
    """Generation prompt for any single-turn request (MCQ, QA construction, judging, ...).

    With audio it holds exactly one <|audio_pad|> placeholder, which the processor expands to the
    clip's length; without audio it holds none.
    """
    prompt = tokenizer.apply_chat_template(
        chat_messages(user_text, system, with_audio), tokenize=False, add_generation_prompt=True
    )
    expected = 1 if with_audio else 0
    if prompt.count(AUDIO_PAD) != expected:
        raise ValueError(f"chat template must render exactly {expected} {AUDIO_PAD}, got {prompt.count(AUDIO_PAD)}")
    return prompt


def build_messages(question: str, choices: Sequence[str], prompt_style: str = "baseline") -> list[dict]:
    """Chat messages holding only what Track 1 allows: audio, question, choices and a fixed prompt."""
    return chat_messages(question_text(question, choices), prompt_system(prompt_style))


def render_prompt(tokenizer, question: str, choices: Sequence[str], prompt_style: str = "baseline") -> str:
    """Prompt text up to and including the assistant header, with one audio placeholder."""
    return render_chat(tokenizer, question_text(question, choices), prompt_system(prompt_style))


def render_target(prompt: str, thinking: str, answer: str) -> str:
    """Assistant continuation for SFT, written by hand.

    The stock template drops <think>...</think> from assistant turns whose user content is a list
    (always so with audio), so the target is appended to the generation prompt instead. Whatever
    the generation prompt already opens (some templates end with "<think>\\n") is not repeated.
    """
    full = f"{THINK_OPEN}\n{thinking.strip()}\n{THINK_CLOSE}\n\n{answer}{IM_END}"
    # The longest prefix of `full` that ends the prompt starts at one of the prompt's last len(full)
    # characters equal to full[0]; trying only those, earliest first, is linear (trying every
    # length was quadratic in the reasoning's: ~0.5 ms of CPU a 1.3k-character record, 10^5 records a run).
    start = prompt.find(full[0], max(0, len(prompt) - len(full)))
    while start != -1:
        if full.startswith(prompt[start:]):
            return full[len(prompt) - start:]
        start = prompt.find(full[0], start + 1)
    return full


def eos_token_ids(tokenizer) -> list[int]:
    """Tokens that end a generation: end of turn, and end of text (also the padding token)."""
    ids = [tokenizer.convert_tokens_to_ids(token) for token in (IM_END, ENDOFTEXT)]
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise KeyError(f"tokenizer lacks {IM_END} or {ENDOFTEXT}")
    return ids
