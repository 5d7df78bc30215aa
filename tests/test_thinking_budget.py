"""Issue 16, item 4: the thinking budget at generation time, the same two phases in both engines.

The hf engine runs end to end on the tiny model; the vLLM engine's adapter runs against a fake
`vllm.LLM` that records what it is asked (vLLM is not installed here), through the same
`Engine.generate_batches`. tests/test_vllm.py compares real vLLM with the hf engine under a budget.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from core import qwen_omni as qo
from core.items import load_items
from core.recipe import load_recipe
from infer.engine import Request, SamplingConfig, ThinkingBudget, VLLMEngine, load_engine, vllm_prompt
from infer.run import run


@pytest.fixture(scope="module")
def tiny_recipe(tiny_checkpoint, synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("budget")
    return load_recipe("recipes/tiny.yaml", [
        f"model.path={tiny_checkpoint}", f"infer.meta={synthetic_dir / 'test.jsonl'}", "infer.adapter=null",
        f"infer.output={out / 'submission.jsonl'}", "infer.limit=4", "infer.batch_size=4",
        "infer.max_new_tokens=30", "infer.min_new_tokens=30", "infer.thinking_budget=8",
    ])


@pytest.fixture(scope="module")
def engine(tiny_recipe, processor):
    """The tiny random model, kept from writing </think> itself: whether its argmax lands on that token
    depends on the tokenizer's ids, and these tests need a thinking that only the budget closes."""
    engine = load_engine(tiny_recipe, device="cpu")
    think_close = processor.tokenizer.convert_tokens_to_ids(qo.THINK_CLOSE)

    def never_close(module, args, logits):
        logits[..., think_close] = -1e4
        return logits

    engine.model.lm_head.register_forward_hook(never_close)
    return engine


@pytest.fixture(scope="module")
def requests(synthetic_dir, processor):
    items = load_items(synthetic_dir / "test.jsonl")[:4]
    return [Request(i.id, qo.render_prompt(processor.tokenizer, i.question, i.choices), i.load_audio()) for i in items]


@pytest.mark.slow  # three greedy runs of the tiny model with audio: ~30 s on a loaded 2-core machine
def test_hf_budget_closes_the_thinking_and_the_model_continues(engine, requests, processor):
    tok = processor.tokenizer
    close_ids = tok(qo.THINK_BUDGET_CLOSE, add_special_tokens=False)["input_ids"]
    sampling = engine.sampling
    assert (sampling.thinking_budget, sampling.max_new_tokens) == (8, 30)
    budgeted = engine.generate(requests, sampling)
    free = engine.generate(requests, sampling.replace(thinking_budget=None))
    think_close = tok.convert_tokens_to_ids(qo.THINK_CLOSE)
    for gen, plain, request in zip(budgeted, free, requests):
        assert think_close not in plain.token_ids  # the model never closes its thinking by itself (the fixture)
        assert gen.budget_fired
        # The first 8 tokens are the model's own (as without a budget), then the closing text, then the model again.
        assert gen.token_ids[:8] == plain.token_ids[:8]
        assert list(gen.token_ids[8:8 + len(close_ids)]) == close_ids
        assert qo.THINK_BUDGET_CLOSE in gen.text and gen.text.startswith(tok.decode(list(plain.token_ids[:8])))
        assert gen.n_generated_tokens == 30 and not gen.finished  # max_new_tokens covers both phases
        # The continuation is exactly what greedy decoding writes after prompt + 8 tokens + closing text.
        inputs = processor([request.prompt], [request.audio])
        prefix = torch.tensor([list(gen.token_ids[:8 + len(close_ids)])])
        ids = torch.cat([inputs["input_ids"], prefix], dim=1)
        rest = 30 - prefix.shape[1]
        with torch.inference_mode():
            out = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        input_features=inputs["input_features"],
                                        feature_attention_mask=inputs["feature_attention_mask"],
                                        max_new_tokens=rest, min_new_tokens=rest, do_sample=False,
                                        eos_token_id=processor.eos_token_ids, pad_token_id=tok.pad_token_id)
        assert list(gen.token_ids[prefix.shape[1]:]) == out[0, ids.shape[1]:].tolist()
    assert not any(g.budget_fired for g in free)


def test_run_records_the_budget_per_item_and_in_the_summary(tiny_recipe, engine):
    import json
    from pathlib import Path

    summary = run(tiny_recipe, engine=engine)
    raw = [json.loads(line) for line in Path(tiny_recipe.infer.output.replace(".jsonl", ".raw.jsonl")).read_text().splitlines()]
    assert [r["thinking_budget_fired"] for r in raw] == [True] * 4
    assert all(qo.THINK_BUDGET_CLOSE in r["raw_output"] and not r["truncated"] for r in raw)
    assert summary["totals"]["thinking_budget_fired"] == 4 and summary["totals"]["thinking_cut"] == 0
    assert summary["sampling"]["thinking_budget"] == 8


class FakeLLM:
    """Stands in for vllm.LLM: scripted completions by request and phase; records every prompt."""

    def __init__(self, script, tokenizer):
        self.script, self.tokenizer, self.calls = script, tokenizer, []

    def generate(self, prompts, params, use_tqdm):
        self.calls.append((prompts, params))
        phase = 0 if len(self.calls) == 1 else 1
        outs = []
        for prompt in prompts:
            text = self.tokenizer.decode(prompt["prompt_token_ids"])
            rid = next(r for r in self.script if text.startswith(f"Q{r}"))
            ids, reason = self.script[rid][phase]
            outs.append(SimpleNamespace(prompt_token_ids=[0] * 5,
                                        outputs=[SimpleNamespace(token_ids=ids, finish_reason=reason)]))
        return outs


def test_vllm_adapter_runs_the_same_two_phases(processor):
    tok = processor.tokenizer
    words = tok("one two three four five six", add_special_tokens=False)["input_ids"]
    think_close, im_end = tok.convert_tokens_to_ids(qo.THINK_CLOSE), tok.convert_tokens_to_ids(qo.IM_END)
    budget = len(words)
    answer = tok("six", add_special_tokens=False)["input_ids"]
    script = {  # id -> (phase 1 (ids, finish reason), phase 2)
        "a": ((words[:2] + [im_end], "stop"), None),  # ends inside the budget: final after phase 1
        "b": ((words[:2] + [think_close] + words[3:], "length"), (answer + [im_end], "stop")),  # closed in time
        "c": ((words, "length"), (answer + [im_end], "stop")),  # the budget fires
    }
    engine = object.__new__(VLLMEngine)
    engine._vllm = SimpleNamespace(SamplingParams=lambda **kw: kw)
    engine.llm, engine.tokenizer, engine.batch_size = FakeLLM(script, tok), tok, 8
    engine.eos_ids = qo.eos_token_ids(tok)
    engine.sampling = SamplingConfig.greedy(max_new_tokens=100, thinking_budget=budget)
    requests = [Request(rid, f"Q{rid} ", None) for rid in script]
    gens = {g.id: g for g in engine.generate(requests)}

    (first_prompts, first_params), (second_prompts, second_params) = engine.llm.calls
    close_ids = ThinkingBudget.plan(engine.sampling, tok).close_ids
    assert first_params["max_tokens"] == budget and second_params["max_tokens"] == 100 - budget - len(close_ids)
    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    assert [p["prompt_token_ids"] for p in first_prompts] == [ids("Qa "), ids("Qb "), ids("Qc ")]
    # Phase 2 continues after the ids phase 1 wrote; the budget's closing ids only where it fired.
    assert [p["prompt_token_ids"] for p in second_prompts] == [
        ids("Qb ") + script["b"][0][0], ids("Qc ") + words + list(close_ids)]
    assert (gens["a"].budget_fired, gens["a"].finished, gens["a"].token_ids) == (False, True, tuple(words[:2]))
    assert not gens["b"].budget_fired and gens["b"].token_ids == tuple(script["b"][0][0] + answer)
    assert gens["c"].budget_fired and gens["c"].token_ids == tuple(words) + close_ids + tuple(answer)
    assert gens["c"].finished and gens["c"].n_generated_tokens == budget + len(close_ids) + len(answer) + 1
    assert gens["c"].text.endswith(qo.THINK_BUDGET_CLOSE + "six")


def test_budget_without_room_for_an_answer_is_not_applied(processor):
    tok = processor.tokenizer
    assert ThinkingBudget.plan(SamplingConfig.greedy(max_new_tokens=10, thinking_budget=8), tok) is None
    assert ThinkingBudget.plan(SamplingConfig.greedy(max_new_tokens=100), tok) is None


def test_vllm_continues_after_the_exact_ids_which_text_would_not_give_back(processor):
    tok = processor.tokenizer
    prompt = qo.render_chat(tok, "What do you hear?")
    # " beep" a byte a token, then the first byte of "é", then the budget's closing: a budget can cut
    # a word or a character, and the model may spell a word in pieces.
    close_ids = tok(qo.THINK_BUDGET_CLOSE, add_special_tokens=False)["input_ids"]
    prefix = tok.convert_tokens_to_ids(["Ġ", "b", "e", "e", "p", "Ã"]) + close_ids
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    # As text (how vLLM got the continuation before): " beep" merged, the lone byte decoded to U+FFFD.
    as_text = tok(prompt + tok.decode(prefix, skip_special_tokens=False), add_special_tokens=False)["input_ids"]
    assert as_text[:len(prompt_ids)] == prompt_ids
    assert as_text[len(prompt_ids):] == tok(" beep\ufffd", add_special_tokens=False)["input_ids"] + close_ids
    assert len(as_text) != len(prompt_ids) + len(prefix)
    built = vllm_prompt(Request("x", prompt, np.ones(1000, np.float32)), tok, tuple(prefix))
    assert built["prompt_token_ids"] == prompt_ids + prefix
    assert built["prompt_token_ids"].count(processor.token_id(qo.AUDIO_PAD)) == 1  # vLLM expands it
    audio, rate = built["multi_modal_data"]["audio"]
    assert rate == qo.SAMPLE_RATE and len(audio) == 1120 and audio[:1000].sum() == 1000 and audio[1000:].sum() == 0
