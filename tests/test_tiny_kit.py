import math

import numpy as np

from core import qwen_omni as qo


def test_checkpoint_loads_like_a_real_one(tiny_checkpoint):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_checkpoint)
    assert config.model_type == "qwen3_omni_moe" and not config.enable_audio_output
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    for token in qo.SPECIAL_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert tokenizer.decode([token_id]) == token, token
    assert config.thinker_config.audio_token_id == tokenizer.convert_tokens_to_ids(qo.AUDIO_PAD)
    assert config.thinker_config.audio_start_token_id == tokenizer.convert_tokens_to_ids(qo.AUDIO_START)
    model = qo.load_thinker(tiny_checkpoint, dtype="float32")
    assert isinstance(model, qo.thinker_class())
    assert model.generation_config.temperature == 0.6 and model.generation_config.top_k == 20


def test_forward_with_audio_gives_finite_loss(tiny_checkpoint, processor):
    model = qo.load_thinker(tiny_checkpoint, dtype="float32")
    prompt = qo.render_prompt(processor.tokenizer, "How many beeps?", ["one", "two"])
    target = qo.render_target(prompt, "I count two onsets.", "two")
    audio = np.sin(np.linspace(0, 2000, 16_000 * 2)).astype(np.float32)
    batch = processor([prompt], [audio], targets=[target], padding_side="right")
    n_audio = int((batch["input_ids"] == processor.token_id(qo.AUDIO_PAD)).sum())
    assert n_audio == qo.audio_token_count(200) == 26  # 2 s -> 200 frames -> 26 tokens (13/s)
    loss = model(**batch).loss
    assert math.isfinite(loss.item())
    # a random model over a ~400-token vocabulary starts near ln(vocab)
    assert 4.0 < loss.item() < 8.0


def test_prompt_is_the_challenge_baseline(processor):
    prompt = qo.render_prompt(processor.tokenizer, "Q?", ["a", "b"])
    assert prompt.startswith("<|im_start|>system\nYou are a multi-task audio understanding and reasoning model.")
    assert "<|audio_start|><|audio_pad|><|audio_end|>Q?\nSelect one option from the provided choices:\na\nb<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "system" not in qo.render_prompt(processor.tokenizer, "Q?", ["a", "b"], prompt_style="qwen")


def test_target_does_not_repeat_what_the_prompt_opens():
    assert qo.render_target("...assistant\n", " why ", "a") == "<think>\nwhy\n</think>\n\na<|im_end|>"
    assert qo.render_target("...assistant\n<think>\n", "why", "a") == "why\n</think>\n\na<|im_end|>"


def test_labels_cover_exactly_the_target(processor):
    prompt = qo.render_prompt(processor.tokenizer, "Which?", ["x", "y"])
    targets = [qo.render_target(prompt, "short", "x"), qo.render_target(prompt, "a much longer reasoning", "y")]
    audios = [np.zeros(16_000, np.float32), np.zeros(24_000, np.float32)]
    batch = processor([prompt, prompt], audios, targets=targets, padding_side="right")
    for row, target in enumerate(targets):
        target_ids = processor.tokenizer(target, add_special_tokens=False)["input_ids"]
        kept = batch["labels"][row][batch["labels"][row] != qo.IGNORE_INDEX].tolist()
        assert kept == target_ids
        assert batch["input_ids"][row][batch["attention_mask"][row].bool()][-len(target_ids):].tolist() == target_ids
        assert "<think>" in processor.tokenizer.decode(kept) and "</think>" in processor.tokenizer.decode(kept)
    assert (batch["labels"][batch["attention_mask"] == 0] == qo.IGNORE_INDEX).all()


def test_left_padding_for_generation(processor):
    prompt = qo.render_prompt(processor.tokenizer, "Which?", ["x", "y"])
    batch = processor([prompt, prompt], [np.zeros(8_000, np.float32), np.zeros(32_000, np.float32)])
    assert "labels" not in batch
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][0, 0]


def test_lora_targets_stay_out_of_the_audio_tower(tiny_checkpoint):
    model = qo.load_thinker(tiny_checkpoint, dtype="float32")
    names = qo.lora_target_names(model, qo.ATTENTION_PROJECTIONS)
    assert len(names) == 2 * 4  # 2 text layers x q/k/v/o
    assert all(n.startswith("model.layers.") for n in names)
    with_audio = qo.lora_target_names(model, ("q_proj",), include_audio_tower=True)
    assert any("audio_tower" in n for n in with_audio) and not any("visual" in n for n in with_audio)
    assert qo.expert_parameter_names(model) == [
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in qo.EXPERT_PARAMETERS
    ]
    assert len(qo.text_layers(model)) == 2
    assert any(isinstance(m, qo.moe_block_class()) for m in model.modules())
