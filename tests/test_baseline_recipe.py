"""Issue 16, item 5: recipes/baseline.yaml reproduces the official baseline's inference settings."""

from __future__ import annotations

from core import qwen_omni as qo
from core.recipe import load_recipe
from infer.engine import SamplingConfig, ThinkingBudget

QWEN_GENERATION_CONFIG = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}


def test_baseline_recipe_decodes_greedily_with_1024_tokens_and_no_budget(processor):
    recipe = load_recipe("recipes/baseline.yaml")
    sampling = SamplingConfig.resolve(recipe.infer, QWEN_GENERATION_CONFIG)  # the checkpoint's sampling is overridden
    assert sampling == SamplingConfig(max_new_tokens=1024, do_sample=False, temperature=1.0, top_p=1.0, top_k=0)
    assert ThinkingBudget.plan(sampling, processor.tokenizer) is None
    assert (recipe.infer.backend, recipe.infer.batch_size, recipe.infer.adapter) == ("hf", 1, None)
    # Full audio, as the processor takes it (its own ceiling, 4,800,000 samples, is above any MMAR clip).
    assert recipe.infer.max_audio_seconds is None


def test_baseline_prompt_is_the_official_one_through_the_checkpoint_template(processor):
    recipe = load_recipe("recipes/baseline.yaml")
    question, choices = "Which sound comes first?", ["a bell", "a dog"]
    # The official script's messages, written out here independently of core.qwen_omni.
    official = [
        {"role": "system", "content": [{"type": "text", "text": "You are a multi-task audio understanding and reasoning model."}]},
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text":
                                     "Which sound comes first?\nSelect one option from the provided choices:\na bell\na dog"}]},
    ]
    expected = processor.tokenizer.apply_chat_template(official, tokenize=False, add_generation_prompt=True)
    assert qo.render_prompt(processor.tokenizer, question, choices, recipe.model.prompt_style) == expected
