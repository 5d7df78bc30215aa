import numpy as np
import pytest

from core import qwen_omni as qo
from core.items import load_items
from core.recipe import InferConfig, load_recipe
from infer.engine import (
    HFEngine,
    Request,
    SamplingConfig,
    length_buckets,
    load_engine,
    vllm_engine_kwargs,
    vllm_prompt,
    vllm_sampling_kwargs,
)

FIXED = SamplingConfig.greedy(max_new_tokens=12, min_new_tokens=12)  # the random model would stop at once


@pytest.fixture(scope="module")
def tiny_recipe(tiny_checkpoint, synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("infer")
    return load_recipe("recipes/tiny.yaml", [
        f"model.path={tiny_checkpoint}", f"infer.meta={synthetic_dir / 'test.jsonl'}", "infer.adapter=null",
        f"infer.output={out / 'submission.jsonl'}", "infer.max_new_tokens=12", "infer.min_new_tokens=12",
    ])


@pytest.fixture(scope="module")
def engine(tiny_recipe):
    return load_engine(tiny_recipe, device="cpu")


@pytest.fixture(scope="module")
def requests(synthetic_dir, processor):
    items = load_items(synthetic_dir / "test.jsonl")[:6]
    return [Request(i.id, qo.render_prompt(processor.tokenizer, i.question, i.choices), i.load_audio()) for i in items]


def test_batched_equals_one_by_one_greedy(engine, requests):
    assert len({len(r.audio) for r in requests}) > 1  # clips of different lengths: padding is exercised
    engine.batch_size = 4
    batched = engine.generate(requests, FIXED)
    engine.batch_size = 1
    single = engine.generate(requests, FIXED)
    assert [g.id for g in batched] == [r.id for r in requests]  # request order restored
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert [g.text for g in batched] == [g.text for g in single]
    assert len({g.token_ids for g in batched}) > 1  # not one degenerate output for every item
    for gen in batched:
        assert gen.n_generated_tokens == 12 and not gen.finished and gen.truncated
    assert [g.n_prompt_tokens for g in batched] == [g.n_prompt_tokens for g in single]


def test_generation_stops_at_end_of_turn(engine, requests, processor):
    engine.batch_size = 3
    free = engine.generate(requests, SamplingConfig.greedy(max_new_tokens=40))
    end_id = processor.token_id(qo.IM_END)
    steps = []

    def end_from_sixth_step(module, args, logits):
        steps.append(1)
        # one forward per new token: five tokens that are no end token (whatever the random model
        # prefers), then the end
        if len(steps) >= 6:
            logits[..., -1, end_id] = 1e4
        else:
            logits[..., -1, processor.eos_token_ids] = -1e4
        return logits

    ended = []
    handle = engine.model.lm_head.register_forward_hook(end_from_sixth_step)
    try:
        for request in requests[:2]:
            steps.clear()
            ended += engine.generate([request], SamplingConfig.greedy(max_new_tokens=40))
    finally:
        handle.remove()
    for g in ended:  # the end token is counted, not kept
        assert g.finished and len(g.token_ids) == 5 and g.n_generated_tokens == 6
    for g in free:
        if g.finished:
            assert g.n_generated_tokens == len(g.token_ids) + 1 <= 40
        else:
            assert g.truncated and g.n_generated_tokens == len(g.token_ids) == 40
    for g in free + ended:
        assert "<|im_end|>" not in g.text and "<|endoftext|>" not in g.text


def test_text_only_requests_and_mixed_batches(engine, requests, processor):
    prompt = qo.render_chat(processor.tokenizer, "Rate this answer.", system="You are a judge.", with_audio=False)
    assert qo.AUDIO_PAD not in prompt and prompt.startswith("<|im_start|>system\nYou are a judge.")
    text_requests = [Request("judge-0", prompt), Request("judge-1", prompt + "x")]
    engine.batch_size = 4
    mixed = engine.generate([text_requests[0], requests[0], text_requests[1]], FIXED)
    alone = engine.generate(text_requests, FIXED)
    assert [g.id for g in mixed] == ["judge-0", requests[0].id, "judge-1"]
    assert mixed[0].token_ids == alone[0].token_ids and mixed[2].token_ids == alone[1].token_ids


def test_request_checks_its_audio_placeholder(requests):
    with pytest.raises(ValueError, match="request r: prompt: holds 1 <\\|audio_pad\\|>, expected 0"):
        Request("r", requests[0].prompt)
    with pytest.raises(ValueError, match="expected 1"):
        Request("r", "no placeholder", np.zeros(160, np.float32))


def test_length_buckets_sort_longest_first_and_keep_audio_apart(processor):
    prompt = qo.render_chat(processor.tokenizer, "Q", with_audio=True)
    text = qo.render_chat(processor.tokenizer, "Q", with_audio=False)
    reqs = [Request(f"a{n}", prompt, np.zeros(16_000 * n, np.float32)) for n in (1, 3, 2)] + [Request("t", text)]
    assert length_buckets(reqs, processor.tokenizer, 2) == [[1, 2], [0], [3]]


def test_sampled_generation_is_seeded(engine, requests):
    engine.batch_size = 2
    sampled = SamplingConfig(max_new_tokens=8, min_new_tokens=8, do_sample=True, temperature=1.0, top_k=50, seed=3)
    first = engine.generate(requests[:2], sampled)
    again = engine.generate(requests[:2], sampled)
    other = engine.generate(requests[:2], sampled.replace(seed=4))
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert [g.token_ids for g in first] != [g.token_ids for g in other]


def test_sampling_defaults_come_from_the_checkpoint_unless_the_recipe_sets_them():
    checkpoint = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 64}
    resolved = SamplingConfig.resolve(InferConfig(max_new_tokens=100), checkpoint)
    assert resolved == SamplingConfig(max_new_tokens=100, do_sample=True, temperature=0.6, top_p=0.95, top_k=20,
                                      thinking_budget=2000)  # the recipe's default budget travels with the sampling
    assert SamplingConfig.resolve(InferConfig(temperature=0.3, seed=7), checkpoint).temperature == 0.3
    greedy = SamplingConfig.resolve(InferConfig(do_sample=False), checkpoint)
    assert (greedy.do_sample, greedy.temperature, greedy.top_k) == (False, 1.0, 0)
    assert SamplingConfig.resolve(InferConfig(), {}).do_sample is False


def test_adapter_is_applied(tiny_recipe, tiny_checkpoint, requests, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    model = qo.load_thinker(tiny_checkpoint, dtype="float32")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=qo.lora_target_names(model, qo.ATTENTION_PROJECTIONS),
                        init_lora_weights=False)  # non-zero B: the adapter changes the outputs
    torch.manual_seed(0)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    reference = HFEngine(peft_model, qo.OmniProcessor.from_pretrained(tiny_checkpoint), FIXED, 2, "cpu")
    adapted = load_engine(tiny_recipe.model_copy(update={"infer": tiny_recipe.infer.model_copy(
        update={"adapter": str(tmp_path / "adapter")})}), device="cpu")
    base = load_engine(tiny_recipe, device="cpu")
    adapted_ids = [g.token_ids for g in adapted.generate(requests[:3], FIXED)]
    assert adapted_ids == [g.token_ids for g in reference.generate(requests[:3], FIXED)]
    assert adapted_ids != [g.token_ids for g in base.generate(requests[:3], FIXED)]


def test_missing_adapter_fails_clearly(tiny_recipe, tmp_path):
    recipe = tiny_recipe.model_copy(update={"infer": tiny_recipe.infer.model_copy(update={"adapter": str(tmp_path / "none")})})
    with pytest.raises(FileNotFoundError, match="adapter_config.json missing.*infer.adapter=null"):
        load_engine(recipe, device="cpu")


def test_vllm_request_and_sampling_construction(tiny_recipe, processor):
    tok = processor.tokenizer
    wave = np.zeros(1600, np.float32)
    request = Request("x", "<|audio_pad|> prompt", wave)
    built = vllm_prompt(request, tok)
    # the placeholder unexpanded, one token: vLLM's processor expands it
    assert built["prompt_token_ids"] == [processor.token_id(qo.AUDIO_PAD)] + tok(" prompt")["input_ids"]
    assert built["multi_modal_data"]["audio"][0] is wave and built["multi_modal_data"]["audio"][1] == 16_000
    assert vllm_prompt(Request("t", "judge me"), tok) == {"prompt_token_ids": tok("judge me")["input_ids"]}
    greedy = vllm_sampling_kwargs(SamplingConfig.greedy(256), [7, 8])
    assert greedy["temperature"] == 0.0 and greedy["top_k"] == -1 and greedy["max_tokens"] == 256
    assert greedy["stop_token_ids"] == [7, 8] and greedy["skip_special_tokens"] is False
    sampled = vllm_sampling_kwargs(SamplingConfig(16384, do_sample=True, temperature=0.6, top_p=0.95, top_k=20, seed=5), [7])
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"], sampled["n"]) == (0.6, 0.95, 20, 1)
    # no per-request seed: copies of a prompt must sample apart (the engine's own seed makes a run repeat)
    assert "seed" not in sampled and vllm_sampling_kwargs(SamplingConfig(8, do_sample=True), [7], n=4)["n"] == 4
    recipe = load_recipe("recipes/cogito.yaml", ["infer.tensor_parallel_size=2", "infer.max_model_len=20000"])
    kwargs = vllm_engine_kwargs(recipe)
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["max_model_len"] == 20000
    assert kwargs["limit_mm_per_prompt"] == {"audio": 1, "image": 0, "video": 0} and kwargs["model"] == recipe.model.path
    assert "kv_cache_memory_bytes" not in kwargs and "enforce_eager" not in kwargs  # GPUs: vLLM's own sizing, compiled
    on_cpu = vllm_engine_kwargs(load_recipe("recipes/tiny.yaml", ["infer.adapter=null", "infer.kv_cache_gib=1.5",
                                                                   "infer.enforce_eager=true"]))
    assert on_cpu["kv_cache_memory_bytes"] == 1_610_612_736 and on_cpu["enforce_eager"] is True
    with pytest.raises(ValueError, match="merge it into the base weights"):
        vllm_engine_kwargs(load_recipe("recipes/cogito.yaml", ["infer.adapter=runs/cogito/adapter"]))
