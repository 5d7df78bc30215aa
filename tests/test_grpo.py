"""GRPO (train/grpo.py, train/rewards.py): advantages, the loss, each reward, the recipe section,
and short runs on the tiny kit (resume equivalence, KL to the adapter-free base, the SFT adapter start)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from core.items import Item
from core.recipe import JudgeConfig, RecipeError, load_recipe
from infer.parse import parse_output
from tests.test_train import adapter_weights, launch_ranks, metrics
from train.grpo import GRPO_ALSO, GRPO_SECTIONS
from train.loss import Normalisation, group_advantages, grpo_loss, truncated_importance_weights
from train.rewards import (
    REASONING_RUBRIC,
    EmbeddingReward,
    JudgeReward,
    Rollout,
    TextEmbedder,
    answer_reward,
    format_reward,
    length_reward,
)
from train.runtime import TrainingError, check_resumable

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- advantages and loss


def test_group_advantages_normalise_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.0, 1.0, 1.0, 0.0])
    adv = group_advantages(rewards, group_size=4)
    std = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)  # unbiased std of [1, 0, 0, 0]
    np.testing.assert_allclose(adv[:4], np.array([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4), rtol=1e-6)
    assert adv[4:8].tolist() == [0.0, 0.0, 0.0, 0.0]  # all equal: no signal
    np.testing.assert_allclose(adv[8:], np.array([-0.5, 0.5, 0.5, -0.5]) / (math.sqrt(1 / 3) + 1e-4), rtol=1e-6)
    centred = group_advantages(rewards, group_size=4, scale="none")
    np.testing.assert_allclose(centred[:4], [0.75, -0.25, -0.25, -0.25])
    for group in adv.view(-1, 4):
        assert abs(float(group.sum())) < 1e-5


def test_loss_at_ratio_one_is_the_token_mean_policy_gradient():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([2.0, -1.0])
    parts = grpo_loss(logps, logps.detach(), adv, mask, total_tokens=5, clip_low=0.2, clip_high=0.2)
    assert parts.loss.item() == pytest.approx(-(2.0 * 3 - 1.0 * 2) / 5)
    parts.loss.backward()
    # d loss / d logp = -A / N on every completion token, 0 on padding
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.4, -0.4, -0.4], [0.2, 0.2, 0.0]]))
    assert (parts.tokens, parts.clipped, parts.kl_sum) == (5, 0, 0.0)


def test_loss_clips_the_ratio_on_the_side_of_the_advantage():
    old = torch.zeros(4, 1)
    logps = torch.tensor([[0.5], [0.5], [-0.5], [-0.5]], requires_grad=True)  # ratio e^0.5 = 1.65 or e^-0.5 = 0.61
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    parts = grpo_loss(logps, old, adv, torch.ones(4, 1), total_tokens=4, clip_low=0.2, clip_high=0.28)
    # row 0: ratio above 1 + 0.28 with A > 0 -> clipped to 1.28; row 3: below 1 - 0.2 with A < 0 -> clipped to 0.8
    expected = -(1.28 * 1 + math.exp(0.5) * -1 + math.exp(-0.5) * 1 + 0.8 * -1) / 4
    assert parts.loss.item() == pytest.approx(expected, rel=1e-6)
    assert parts.clipped == 2
    parts.loss.backward()
    assert logps.grad[0].item() == 0.0 and logps.grad[3].item() == 0.0  # clipped tokens get no gradient
    assert logps.grad[1].item() == pytest.approx(math.exp(0.5) / 4) and logps.grad[2].item() == pytest.approx(-math.exp(-0.5) / 4)


def test_loss_kl_term_to_the_reference():
    logps = torch.full((1, 3), -1.0)
    mask = torch.tensor([[1, 1, 0]])
    same = grpo_loss(logps, logps, torch.zeros(1), mask, 2, 0.2, 0.2, ref_logps=logps.clone(), beta=0.5)
    assert same.kl_sum == 0.0 and same.loss.item() == 0.0
    ref = logps - 1.0  # k3: exp(-1) + 1 - 1 per token
    apart = grpo_loss(logps, logps, torch.zeros(1), mask, 2, 0.2, 0.2, ref_logps=ref, beta=0.5)
    assert apart.kl_sum == pytest.approx(2 * math.exp(-1))
    assert apart.loss.item() == pytest.approx(0.5 * math.exp(-1))
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(logps, logps, torch.zeros(1), mask, 2, 0.2, 0.2, beta=0.5)


def test_loss_split_over_micro_batches_sums_to_the_whole():
    torch.manual_seed(0)
    logps, old = torch.randn(4, 6), torch.randn(4, 6)
    mask = (torch.rand(4, 6) > 0.3).long()
    adv = torch.randn(4)
    total = int(mask.sum())
    whole = grpo_loss(logps, old, adv, mask, total, 0.2, 0.2).loss
    halves = sum(grpo_loss(logps[s], old[s], adv[s], mask[s], total, 0.2, 0.2).loss for s in (slice(0, 1), slice(1, 4)))
    assert whole.item() == pytest.approx(halves.item(), rel=1e-6)


@pytest.mark.parametrize("loss_type, expected, grad", [
    # token losses -A: [-2, -2, -2] and [1, 1] (ratio 1); 5 tokens, 2 sequences, max_length 4
    ("dapo", -4 / 5, [[-2 / 5] * 3, [1 / 5, 1 / 5, 0.0]]),  # sum / tokens of the global batch
    ("grpo", (-2 + 1) / 2, [[-2 / 3 / 2] * 3, [1 / 2 / 2, 1 / 2 / 2, 0.0]]),  # per-sequence mean, then the mean
    ("dr_grpo", -4 / (2 * 4), [[-2 / 8] * 3, [1 / 8, 1 / 8, 0.0]]),  # sum / (sequences x max_length)
])
def test_loss_types_normalise_as_trl(loss_type, expected, grad):
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([2.0, -1.0])
    norm = Normalisation(loss_type, tokens=5, sequences=2, max_length=4)
    parts = grpo_loss(logps, logps.detach(), adv, mask, norm, 0.2, 0.2)
    assert parts.loss.item() == pytest.approx(expected)
    parts.loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor(grad))
    # micro-batches (and ranks) add up to the whole batch's loss under every form
    halves = sum(grpo_loss(logps[s].detach(), logps[s].detach(), adv[s], mask[s], norm, 0.2, 0.2).loss
                 for s in (slice(0, 1), slice(1, 2)))
    assert halves.item() == pytest.approx(expected)


def test_normalisation_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="needs the global batch's number of sequences"):
        Normalisation("grpo", tokens=5)
    with pytest.raises(ValueError, match="maximal completion length"):
        Normalisation("dr_grpo", tokens=5, sequences=2)
    with pytest.raises(ValueError, match="unknown grpo.loss_type"):
        Normalisation("bnpo", tokens=5)


def test_sequence_level_ratio_is_gspo():
    old = torch.zeros(2, 3)
    # log-ratios: sequence 0 [0.1, 0.3, 0.2] (mean 0.2); sequence 1 [-0.1, 0.1] and a masked 5.0 (mean 0)
    logps = torch.tensor([[0.1, 0.3, 0.2], [-0.1, 0.1, 5.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.0, -1.0])
    parts = grpo_loss(logps, old, adv, mask, 5, 0.2, 0.2, level="sequence")
    # sequence 0: ratio e^0.2 = 1.2214 > 1.2 with A > 0, clipped for all 3 tokens: -1.2 each, no gradient;
    # sequence 1: ratio e^0 = 1, 2 tokens of +1; d ratio / d logp_t = ratio / 2 tokens
    assert parts.loss.item() == pytest.approx((-1.2 * 3 + 2) / 5)
    assert parts.clipped == 3 and parts.tokens == 5
    parts.loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.2, 0.0]]))
    # per token, sequence 0's first token (ratio e^0.1 = 1.105) is inside the clip and keeps its gradient
    token = torch.tensor([[0.1, 0.3, 0.2], [-0.1, 0.1, 5.0]], requires_grad=True)
    parts = grpo_loss(token, old, adv, mask, 5, 0.2, 0.2, level="token")
    parts.loss.backward()
    assert parts.clipped == 2  # e^0.3 and e^0.2 above 1.2
    assert token.grad[0, 0].item() == pytest.approx(-math.exp(0.1) / 5) and token.grad[0, 1:].tolist() == [0.0, 0.0]


def test_truncated_importance_weights_scale_the_policy_term():
    trainer = torch.tensor([[-1.0, -1.0, -1.0]])
    rollout = torch.tensor([[-2.0, -0.5, -1.0]])  # the engine found token 0 less likely, token 1 more
    weights = truncated_importance_weights(trainer, rollout, cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([[2.0, math.exp(-0.5), 1.0]]))  # e^1 = 2.72 capped at 2
    logps = torch.zeros(1, 3, requires_grad=True)
    parts = grpo_loss(logps, logps.detach(), torch.tensor([1.0]), torch.ones(1, 3), 3, 0.2, 0.2, rollout_weights=weights)
    assert parts.loss.item() == pytest.approx(-(2.0 + math.exp(-0.5) + 1.0) / 3)
    parts.loss.backward()
    torch.testing.assert_close(logps.grad, -weights / 3)


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_chunked_token_logps_equal_the_whole_ones_and_their_gradients(grpo_recipe, tiny_checkpoint, chunk):
    """train.loss_chunk_tokens in GRPO: the log-probs from the hidden states, a chunk at a time, are the
    logits' ones, and so are the gradients (lm_head has LoRA too: the chunks call the adapted head)."""
    from core import qwen_omni as qo
    from train.lora import apply_lora
    from train.loss import ChunkedTokenLogps, token_logps

    torch.manual_seed(0)
    model, _ = apply_lora(qo.load_thinker(tiny_checkpoint, "float32"), load_recipe(grpo_recipe).lora)
    with torch.no_grad():  # lora_B = 0 would leave lora_A without gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    ids = torch.randint(0, model.config.text_config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :12] = qo.IGNORE_INDEX  # the prompts
    labels[1, 30:] = qo.IGNORE_INDEX  # a shorter completion: right padding
    attention = torch.ones_like(ids)
    attention[1, 30:] = 0
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels}
    weights = torch.randn(2, 39, generator=torch.Generator().manual_seed(2))
    results = []
    for score in (token_logps, ChunkedTokenLogps(model, chunk)):
        model.zero_grad()
        logps, mask = score(model, dict(batch), 0.7)
        (logps * weights).sum().backward()
        results.append((logps.detach(), mask, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (whole, mask, grads), (chunked, chunked_mask, chunked_grads) = results
    assert torch.equal(mask, chunked_mask) and int(mask.sum()) == 28 + 18
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    assert (chunked[~mask] == 0).all() and (chunked[mask] < 0).all()
    assert any("lm_head" in name for name in grads)
    for name in grads:
        assert grads[name].abs().sum() > 0, name
        # float32 summation-order noise (measured: up to 6e-7 of the largest element); a wrong chunk is off by its scale
        scale = float(grads[name].abs().max())
        torch.testing.assert_close(chunked_grads[name], grads[name], rtol=1e-5, atol=2e-6 * scale, msg=name)


# ---------------------------------------------------------------- rewards


ITEM = Item(id="x", audio_path=Path("x.wav"), question="Which tone is higher?", choices=("the first", "the second"),
            answer="the second", thinking="The second tone is at 880 Hz, above the first at 440 Hz.")


def rollout(text: str, thinking_tokens: int = 10, finished: bool = True, rid: str = "x#0") -> Rollout:
    return Rollout(rid, ITEM, text, parse_output(text, ITEM.choices), thinking_tokens, finished)


def test_answer_and_format_rewards():
    right = rollout("<think>\nhigher pitch second\n</think>\n\nthe second")
    wrong = rollout("<think>\nfirst\n</think>\n\nthe first")
    unmatched = rollout("<think>\nhmm\n</think>\n\nno idea")
    # never closed: the parser takes the right choice from its last paragraph, but no answer was given
    unclosed = rollout("<think>\nit is the second")
    repeated = rollout("<think>\nhmm\n</think>\n</think>\n\nthe second")  # tag spam: the answer counts, the format half not
    assert unclosed.parsed.answer == "the second"
    assert answer_reward([right, wrong, unmatched, unclosed, repeated]) == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert format_reward([right, wrong, unmatched, unclosed, repeated]) == [1.0, 1.0, 0.5, 0.0, 0.5]


def test_length_reward_against_the_thinking_budget():
    reward = length_reward(budget=100)
    texts = [rollout("a", thinking_tokens=n) for n in (0, 100, 150, 200, 400)]
    assert reward(texts) == [1.0, 1.0, 0.5, 0.0, 0.0]
    assert reward([rollout("a", thinking_tokens=10, finished=False)]) == [0.0]


class ScriptedJudge:
    """A judge backend that scores the criteria by whether the reasoning mentions 880 Hz."""

    identity = "scripted"
    max_workers = 1

    def __init__(self):
        self.calls = 0
        self.prompts = []

    def complete(self, system: str, user: str) -> str:
        self.calls += 1
        self.prompts.append(user)
        reasoning = user.split("- Model's Reasoning:")[1]
        if "garbled" in reasoning:
            return "not json"
        scores = [2, 2, 1] if "880 Hz" in reasoning else [0, 1, 0]
        return json.dumps([{"name": c["name"], "score": s, "justification": "."} for c, s in zip(REASONING_RUBRIC, scores)])


def test_judge_reward_through_the_eval_backends_and_cache(tmp_path):
    config = JudgeConfig(backend="local", ratings=3, max_attempts=2, cache=str(tmp_path / "cache.sqlite"))
    backend = ScriptedJudge()
    reward = JudgeReward(config, backend)
    batch = [rollout("<think>\nThe second is at 880 Hz.\n</think>\n\nthe second", rid="x#0"),
             rollout("<think>\nno reason\n</think>\n\nthe second", rid="x#1"),
             rollout("<think>\ngarbled\n</think>\n\nthe second", rid="x#2")]
    assert reward(batch) == pytest.approx([5 / 6, 1 / 6, 0.0])
    assert reward.failed == 1 and backend.calls == 3 + 3 + 3 * 2  # the unparsable one asked again, then 0
    calls = backend.calls
    assert reward(batch[:2]) == pytest.approx([5 / 6, 1 / 6]) and backend.calls == calls  # from the cache
    assert backend.prompts[0].count("Ideal Reasoning (for reference): The second tone is at 880 Hz") == 1
    assert all(c["name"] in backend.prompts[0] for c in REASONING_RUBRIC)


@pytest.fixture(scope="module")
def tiny_embedder(tmp_path_factory, tiny_checkpoint) -> Path:
    """A random 1-layer BERT with the tiny kit's tokenizer: the offline stand-in for all-MiniLM-L6-v2."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("embedder")
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_embedding_reward_with_a_tiny_offline_model(tiny_embedder):
    embed = TextEmbedder(str(tiny_embedder))
    vectors = embed(["one sentence", "another, longer sentence here"])
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(2))
    # padding does not change a text's embedding (mean over its own tokens only)
    torch.testing.assert_close(embed(["one sentence"])[0], vectors[0], rtol=1e-5, atol=1e-6)
    reward = EmbeddingReward(embed)
    same = rollout(f"<think>\n{ITEM.thinking}\n</think>\n\nthe second")
    other = rollout("<think>\nzzz qqq\n</think>\n\nthe second")
    scores = reward([same, other])
    assert scores[0] == pytest.approx(1.0, abs=1e-5) and 0.0 <= scores[1] < scores[0]


def test_embedding_reward_is_the_floored_cosine():
    table = {"a": [1.0, 0.0], "b": [0.6, 0.8], "c": [-1.0, 0.0]}

    def fake(texts):
        return torch.tensor([table[t] for t in texts])

    item = Item(id="y", audio_path=Path("y.wav"), question="q", choices=("p", "r"), answer="p", thinking="a")
    batch = [Rollout(f"y#{i}", item, t, parse_output(f"<think>{t}</think>p", item.choices), 1, True) for i, t in enumerate("abc")]
    assert EmbeddingReward(fake)(batch) == pytest.approx([1.0, 0.6, 0.0])


# ---------------------------------------------------------------- recipe


def test_grpo_recipe_section_validates(tmp_path):
    stage = {"name": "s1", "data": [{"path": "x.jsonl"}], "steps": 3}
    ok = load_recipe(None, [f"grpo.stages={json.dumps([stage])}"])
    assert ok.grpo.stages[0].rewards == {"answer": 1.0, "format": 0.2} and ok.grpo.num_generations == 8
    with pytest.raises(RecipeError, match=r"grpo\.stages\.0\.rewards\.speed"):
        load_recipe(None, [f"grpo.stages={json.dumps([{**stage, 'rewards': {'speed': 1}}])}"])
    with pytest.raises(RecipeError, match="judge reward needs grpo.judge.backend"):
        load_recipe(None, [f"grpo.stages={json.dumps([{**stage, 'rewards': {'judge': 1}}])}"])
    with pytest.raises(RecipeError, match="embedding reward needs grpo.embedding_model"):
        load_recipe(None, [f"grpo.stages={json.dumps([{**stage, 'rewards': {'embedding': 1}}])}"])
    with pytest.raises(RecipeError, match="length reward scores against infer.thinking_budget"):
        load_recipe(None, [f"grpo.stages={json.dumps([{**stage, 'rewards': {'length': 1}}])}", "infer.thinking_budget=null"])
    with pytest.raises(RecipeError, match="grpo.num_generations"):
        load_recipe(None, ["grpo.num_generations=1"])
    for shipped in ("recipes/grpo_tiny.yaml", "recipes/grpo_qwen3_omni.yaml"):
        recipe = load_recipe(Path(__file__).resolve().parents[1] / shipped)
        assert recipe.grpo.stages and (recipe.train.batch_size * recipe.train.grad_accum) % recipe.grpo.num_generations == 0


# ---------------------------------------------------------------- short runs on the tiny kit


def letter_share(rollouts) -> list[float]:
    """A reward that varies between the random tiny model's completions (its answers are never right and it
    never stops within a few tokens, so answer and length rewards would be all 0 and move nothing)."""
    return [sum(c.isalpha() for c in r.text) / max(len(r.text), 1) for r in rollouts]


def run_grpo(recipe_file: Path, *overrides: str) -> Path:
    from accelerate.state import AcceleratorState

    import train.grpo
    from train.grpo import main

    AcceleratorState._reset_state(True)
    build = train.grpo.build_rewards
    train.grpo.build_rewards = lambda config, names, budget, device: {**build(config, names, budget, device), "length": letter_share}
    try:
        assert main([str(recipe_file), *overrides]) == 0
    finally:
        train.grpo.build_rewards = build
    return Path(load_recipe(recipe_file, list(overrides)).train.output_dir)


def test_resume_gives_the_uninterrupted_run(grpo_recipe, tmp_path):
    full = run_grpo(grpo_recipe, f"train.output_dir={tmp_path}/full")
    records = metrics(full)
    assert [m["stage"] for m in records] == ["one", "one", "two", "two"]
    for m in records:
        assert all(math.isfinite(m[k]) for k in ("loss", "kl", "clip_fraction", "grad_norm", "rollout_tokens_per_s"))
        assert m["completion_length"] > 0 and 0 <= m["clip_fraction"] <= 1 and m["kl"] >= 0
    assert all(m["kl"] > 0 for m in records)  # the policy has left the base by the second iteration
    assert "reward/format/mean" in records[2] and "reward/format/mean" not in records[0]
    assert records[0]["rollout_accuracy"] == records[0]["reward/answer/mean"]
    rollouts = [json.loads(line) for line in (full / "rollouts" / "rank0.jsonl").read_text().splitlines()]
    assert len(rollouts) == 4 * 4 and {r["step"] for r in rollouts} == {1, 2, 3, 4}

    resumed = tmp_path / "resumed"
    run_grpo(grpo_recipe, f"train.output_dir={resumed}", "train.stop_after=2")
    assert not (resumed / "adapter").exists() and [m["step"] for m in metrics(resumed)] == [1, 2]
    # other GRPO settings, or another thinking budget (the length reward's), would mix two runs
    with pytest.raises(TrainingError, match=r"Differing: grpo.temperature: 1.0 -> 0.7; grpo.beta: 0.1 -> 0.2\. Restore"):
        run_grpo(grpo_recipe, f"train.output_dir={resumed}", "grpo.beta=0.2", "grpo.temperature=0.7")
    with pytest.raises(TrainingError, match=r"Differing: infer.thinking_budget: 2000 -> 50\."):
        run_grpo(grpo_recipe, f"train.output_dir={resumed}", "infer.thinking_budget=50")
    # the judge's pacing changes no rating
    check_resumable(load_recipe(grpo_recipe, [f"train.output_dir={resumed}", "grpo.judge.concurrency=2"]), resumed,
                    GRPO_SECTIONS, GRPO_ALSO)
    run_grpo(grpo_recipe, f"train.output_dir={resumed}")
    again = metrics(resumed)
    assert [m["step"] for m in again] == [1, 2, 3, 4]
    for key in ("loss", "kl", "reward/total/mean", "completion_length", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in again], [m[key] for m in records], rtol=1e-5, err_msg=key)
    texts = [json.loads(line)["text"] for line in (resumed / "rollouts" / "rank0.jsonl").read_text().splitlines()]
    assert texts == [r["text"] for r in rollouts]
    a, b = adapter_weights(full / "adapter"), adapter_weights(resumed / "adapter")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


@pytest.fixture
def nan_from_third_step(monkeypatch):
    """Scoring batches of rollout steps 3, 4, ... carry NaN features (2 micro-batches a step): their loss is NaN."""
    import train.grpo

    calls = []
    real = train.grpo.sequence_batch

    def poisoned(processor, samples):
        batch = real(processor, samples)
        calls.append(1)
        if len(calls) > 4:
            batch["input_features"] = torch.full_like(batch["input_features"], float("nan"))
        return batch

    monkeypatch.setattr(train.grpo, "sequence_batch", poisoned)
    return calls


def test_nonfinite_loss_stops_before_the_checkpoint(grpo_recipe, tmp_path, nan_from_third_step):
    with pytest.raises(TrainingError, match=r"step 3: loss nan, gradient norm nan \(prompts of this rank: syn-train-.*\); "
                                            r"stopped before its checkpoint; newest checkpoint: .*step-2$"):
        run_grpo(grpo_recipe)
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"] and not (run / "adapter").exists()
    assert [m["step"] for m in metrics(run)] == [1, 2] and all(m["skipped"] == 0 for m in metrics(run))


def test_nonfinite_steps_are_skipped_up_to_the_limit(grpo_recipe, tmp_path, nan_from_third_step):
    from safetensors.torch import load_file

    # counted per optimizer step, as in SFT: 2 iterations per rollout step
    assert run_grpo(grpo_recipe, "train.max_nonfinite_steps=4") == tmp_path / "run"
    run = tmp_path / "run"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert "NaN" not in "".join(lines)  # strict JSON: null
    steps = [json.loads(line) for line in lines]
    assert [m["skipped"] for m in steps] == [0, 0, 2, 2] and [m["loss"] is None for m in steps] == [False, False, True, True]
    final = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    at_2 = load_file(str(run / "checkpoints" / "step-2" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() and torch.equal(t, at_2[k]) for k, t in final.items())  # nothing updated after step 2
    assert json.loads((run / "checkpoints" / "step-4" / "trainer_state.json").read_text())["nonfinite_skipped"] == 4
    nan_from_third_step.clear()
    with pytest.raises(TrainingError, match=r"step 4: .*\(2 skipped before, train.max_nonfinite_steps=3\)"):
        run_grpo(grpo_recipe, f"train.output_dir={tmp_path}/limited", "train.max_nonfinite_steps=3")


def test_reference_is_the_base_with_the_adapter_disabled(grpo_recipe, tmp_path):
    # A fresh LoRA starts equal to the base (lora_B = 0): before any update the KL to the reference is 0 exactly.
    run = run_grpo(grpo_recipe, f"train.output_dir={tmp_path}/kl", "grpo.iterations=1", "train.stop_after=1")
    (record,) = metrics(run)
    assert record["kl"] == 0.0 and record["clip_fraction"] == 0.0 and record["grad_norm"] > 0


def trained_looking_adapter(recipe_file: Path, out: Path, tiny_checkpoint: Path) -> Path:
    """An adapter with random lora_B, saved as SFT saves one: a policy away from the base."""
    from core import qwen_omni as qo
    from train.lora import apply_lora

    torch.manual_seed(0)
    sft, _ = apply_lora(qo.load_thinker(tiny_checkpoint, "float32"), load_recipe(recipe_file).lora)
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if "lora_B" in name:
                p.normal_()
    sft.save_pretrained(str(out), save_embedding_layers=False)
    return out


def test_kl_reference_is_the_sft_adapter_it_started_from(grpo_recipe, tmp_path, tiny_checkpoint):
    sft = trained_looking_adapter(grpo_recipe, tmp_path / "sft", tiny_checkpoint)
    start = [f"grpo.init_adapter={sft}", "grpo.iterations=1"]
    resumed = run_grpo(grpo_recipe, f"train.output_dir={tmp_path}/resumed", *start, "train.stop_after=1")
    (first,) = metrics(resumed)
    assert first["kl"] == 0.0  # the policy is still the SFT adapter: no KL to it (to the base it would be far)
    run_grpo(grpo_recipe, f"train.output_dir={resumed}", *start, "train.stop_after=2")
    whole = run_grpo(grpo_recipe, f"train.output_dir={tmp_path}/whole", *start, "train.stop_after=2")
    # after a resume the reference is still the SFT adapter, not the checkpoint (to which step 2's KL would be 0)
    assert metrics(resumed)[1]["kl"] > 0
    assert metrics(resumed)[1]["kl"] == pytest.approx(metrics(whole)[1]["kl"], rel=1e-5)
    a, b = adapter_weights(resumed / "checkpoints" / "step-2" / "adapter"), adapter_weights(whole / "checkpoints" / "step-2" / "adapter")
    for key in a:  # the swapped-in reference weights were put back
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_starts_from_the_sft_adapter(grpo_recipe, tmp_path, tiny_checkpoint):
    from peft import PeftModel

    from train.grpo import load_policy

    trained_looking_adapter(grpo_recipe, tmp_path / "sft", tiny_checkpoint)  # the policy must start from it, not from zero
    policy, placed = load_policy(load_recipe(grpo_recipe, [f"grpo.init_adapter={tmp_path}/sft"]))
    assert placed["text_attention"] == 8 and placed["audio_tower"] == 0
    assert isinstance(policy, PeftModel) and any(p.requires_grad for p in policy.parameters())
    trained = adapter_weights(tmp_path / "sft")
    loaded = {n.replace(".default", ""): p for n, p in policy.named_parameters() if "lora_" in n}
    for key, value in trained.items():
        torch.testing.assert_close(loaded[key], value)
    with pytest.raises(FileNotFoundError, match="grpo.init_adapter"):
        load_policy(load_recipe(grpo_recipe, [f"grpo.init_adapter={tmp_path}/none"]))


def test_rollouts_never_sample_a_placeholder_token(grpo_recipe, synthetic_dir, processor):
    from core import qwen_omni as qo
    from core.items import load_items
    from train.grpo import load_policy
    from train.rollouts import roll_out, rollout_engine, sequence_batch

    recipe = load_recipe(grpo_recipe)
    policy, _ = load_policy(recipe)
    audio_pad = processor.token_id(qo.AUDIO_PAD)
    with torch.no_grad():  # make <|audio_pad|> the likeliest next token everywhere
        policy.get_base_model().lm_head.weight[audio_pad] *= 50
    engine = rollout_engine(policy, processor, recipe, "cpu")
    samples, generated, _ = roll_out(engine, processor, load_items(synthetic_dir / "train.jsonl")[:2], recipe, engine.sampling)
    assert len(samples) == 2 * recipe.grpo.num_generations and generated > 0
    assert all(audio_pad not in s.completion_ids for s in samples)
    batch = sequence_batch(processor, samples)  # scoring sees exactly one audio span per row
    assert (batch["labels"] != qo.IGNORE_INDEX).sum() == sum(len(s.completion_ids) for s in samples)
    policy(**{k: v for k, v in batch.items() if k != "labels"})


def test_loss_chunk_tokens_scores_in_chunks_and_takes_the_same_steps(grpo_recipe, tmp_path, monkeypatch):
    import train.loss

    common = ["grpo.iterations=2", "train.stop_after=1"]
    whole = run_grpo(grpo_recipe, f"train.output_dir={tmp_path}/whole", *common)
    calls = []
    chunked_token_logps = train.loss.chunked_token_logps
    monkeypatch.setattr(train.loss, "chunked_token_logps", lambda *args: calls.append(args[3]) or chunked_token_logps(*args))
    chunked = run_grpo(grpo_recipe, f"train.output_dir={tmp_path}/chunked", *common, "train.loss_chunk_tokens=5")
    # 2 micro-batches: old log-probs, reference, and each of the 2 iterations
    assert calls == [5] * 2 * 4
    (a,), (b,) = metrics(whole), metrics(chunked)
    # The same loss and gradient norm (over every adapter tensor, after the first iteration's update) mean the
    # same step; the weights themselves are not compared: Adam moves a weight by ~lr whatever its gradient's
    # size, so a near-zero gradient summed in another order can move one either way (the chunked gradients
    # themselves are compared element by element in test_chunked_token_logps_equal_the_whole_ones_and_their_gradients).
    for key in ("loss", "kl", "clip_fraction", "grad_norm", "reward/total/mean", "completion_length"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-8), key


def test_group_size_must_divide_the_step(grpo_recipe):
    with pytest.raises(ValueError, match="multiple of grpo.num_generations"):
        run_grpo(grpo_recipe, "grpo.num_generations=3")


def test_vllm_settings_are_checked_before_anything_loads(grpo_recipe, monkeypatch):
    from train.grpo import check_settings

    recipe = load_recipe(grpo_recipe, ["grpo.rollout_logprobs=tis"])
    with pytest.raises(RecipeError, match="rollout_logprobs=tis .* needs grpo.rollout_engine=vllm"):
        check_settings(recipe, 0)
    monkeypatch.setenv("WORLD_SIZE", "6")
    recipe = load_recipe(grpo_recipe, ["grpo.rollout_engine=vllm", "grpo.vllm.tensor_parallel_size=4"])
    with pytest.raises(RecipeError, match="tensor_parallel_size=4 must divide the 6 ranks"):
        check_settings(recipe, 0)
    check_settings(load_recipe(grpo_recipe, ["grpo.rollout_engine=vllm", "grpo.vllm.tensor_parallel_size=3"]), 0)


@pytest.mark.slow
def test_two_processes_zero2(grpo_recipe, tmp_path):
    """Two gloo ranks under DeepSpeed ZeRO-2 (SFT's launch form): each rolls out its own prompts, the
    step's statistics cover both ranks, checkpoints and the adapter are written once."""
    two = tmp_path / "two"
    launch_ranks("cpu_zero2_2proc.yaml", str(REPO / "train/grpo.py"), str(grpo_recipe), f"train.output_dir={two}")
    per_rank = [[json.loads(line) for line in (two / "rollouts" / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    for step in range(1, 5):
        prompts = [{r["id"].split("#")[0] for r in rank if r["step"] == step} for rank in per_rank]
        assert len(prompts[0]) == len(prompts[1]) == 2 and not prompts[0] & prompts[1]
    records = metrics(two)
    assert [m["step"] for m in records] == [1, 2, 3, 4]
    for m in records:  # gathered over both ranks
        both = [r for rank in per_rank for r in rank if r["step"] == m["step"]]
        assert m["completion_length"] == pytest.approx(np.mean([r["tokens"] for r in both]))
        assert m["reward/total/mean"] == pytest.approx(np.mean([r["total"] for r in both]))
        assert math.isfinite(m["loss"]) and m["kl"] >= 0
    assert (two / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-2", "step-4"]
