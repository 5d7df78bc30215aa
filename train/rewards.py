"""GRPO rewards: small functions from a batch of rollouts to one score in [0, 1] each.

Every reward takes the list of `Rollout`s of a step and returns one float per rollout, so the
ones that call a model (judge, embedding) can batch. `build_rewards` turns the recipe into
{name: function}; the stage's weights (`grpo.stages[].rewards`) combine them.

- answer: 1 when the answer after the closed thinking is right under the official rule (core.answer_rule), else 0.
- format: 0.5 for closing the thinking with exactly one </think>, 0.5 more when the answer after the
  last one maps to exactly one choice (infer.parse, the inference parser).
- length: 1 up to `infer.thinking_budget` thinking tokens (the budget inference holds the model to),
  falling linearly to 0 at twice the budget; 0 for an output cut by max_new_tokens.
- judge: an LLM evaluator rates the reasoning against the record's reference `thinking` on
  logical-path alignment, key-step coverage and analytical depth (Audio-DeepThinker's hybrid
  reward), through eval's judge backends, ask-again loop and SQLite cache.
- embedding: cosine similarity (floored at 0) of sentence embeddings of the reasoning and the
  reference `thinking`, from a local sentence-embedding model (mean pooling, as all-MiniLM-L6-v2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from core.answer_rule import is_correct
from core.items import Item
from core.qwen_omni import THINK_CLOSE
from core.recipe import GRPOConfig
from infer.parse import Parsed

REWARDS = ("answer", "format", "length", "judge", "embedding")


@dataclass(frozen=True)
class Rollout:
    id: str  # "<item id>#<g>": unique within a step
    item: Item
    text: str  # the completion as generated, special tokens kept
    parsed: Parsed
    thinking_tokens: int  # generated tokens before the last </think> (all of them when there is none)
    finished: bool  # ended with an end-of-turn token (not cut by max_new_tokens)


Reward = Callable[[Sequence[Rollout]], list[float]]


def answer_reward(rollouts: Sequence[Rollout]) -> list[float]:
    # Only an answer given after the thinking is closed: the parser's fallback for an unclosed output (its
    # last paragraph) is for scoring cut-off submissions. Paid in training, it taught the tiny policy to stop
    # before </think>, where its reasoning's "so the answer is X" scored better than its own answer (collapse).
    return [float(not r.parsed.truncated and is_correct(r.parsed.answer, r.item.answer, r.item.choices)) for r in rollouts]


def format_reward(rollouts: Sequence[Rollout]) -> list[float]:
    # Exactly one </think>: a policy paid for "closes </think>" alone learns to repeat the tag.
    return [0.5 * (r.text.count(THINK_CLOSE) == 1) + 0.5 * (r.parsed.matched and not r.parsed.truncated) for r in rollouts]


def length_reward(budget: int) -> Reward:
    def reward(rollouts: Sequence[Rollout]) -> list[float]:
        return [max(0.0, min(1.0, 2.0 - r.thinking_tokens / budget)) if r.finished else 0.0 for r in rollouts]

    return reward


# Audio-DeepThinker's reasoning criteria, scored against the reference chain (0: no, 1: partly, 2: fully).
REASONING_RUBRIC = [
    {"name": "Logical Path Alignment", "choices": [0, 1, 2],
     "scoring_point": "Award 2 points if the reasoning follows the same logical path as the ideal reasoning, "
                      "1 point if it partly does, 0 if it reaches its answer another way or not at all."},
    {"name": "Key-Step Coverage", "choices": [0, 1, 2],
     "scoring_point": "Award 2 points if the reasoning covers every key step (acoustic evidence and inference) "
                      "of the ideal reasoning, 1 point if it covers some, 0 if none."},
    {"name": "Analytical Depth", "choices": [0, 1, 2],
     "scoring_point": "Award 2 points if the reasoning analyses the audio evidence in depth before concluding, "
                      "1 point if the analysis is shallow, 0 if it only asserts an answer."},
]


class JudgeReward:
    """Trimmed mean of `judge.ratings` ratings per rollout; a rollout the judge never rated gets 0 (counted)."""

    def __init__(self, config, backend=None):
        from eval.cache import JudgeCache
        from eval.judge import Backoff, RateLimiter, make_backend, sampling_settings

        self.config = config
        self.backend = backend or make_backend(config)
        self.cache = JudgeCache(config.cache)
        self.settings = sampling_settings(config)
        self.limiter = RateLimiter(config.requests_per_minute)
        self.backoff = Backoff(config.backoff_s, config.backoff_max_s)
        self.failed = 0

    def __call__(self, rollouts: Sequence[Rollout]) -> list[float]:
        from eval.judge import JudgeJob, run_judge
        from eval.protocol import judge_user_prompt, trimmed_mean

        jobs = [JudgeJob(r.id, judge_user_prompt(r.item.question, r.item.answer, r.item.thinking or "",
                                                 REASONING_RUBRIC, r.parsed.thinking, r.parsed.answer),
                         REASONING_RUBRIC) for r in rollouts]
        result = run_judge(jobs, self.backend, self.cache, self.config.ratings, self.settings,
                           self.config.max_attempts, self.limiter, self.backoff, progress=False)
        self.failed += len(result.failures)
        return [trimmed_mean(result.ratings[r.id]) if r.id in result.ratings else 0.0 for r in rollouts]


class TextEmbedder:
    """Sentence embeddings from a local transformers encoder: attention-masked mean pooling, L2-normalised
    (what sentence-transformers computes for all-MiniLM-L6-v2)."""

    def __init__(self, path: str, device: str = "cpu", max_length: int = 512):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device, self.max_length = device, max_length

    def __call__(self, texts: Sequence[str]):
        import torch

        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled.float(), dim=-1)


class EmbeddingReward:
    def __init__(self, embedder: Callable):
        self.embed = embedder

    def __call__(self, rollouts: Sequence[Rollout]) -> list[float]:
        ours = self.embed([r.parsed.thinking for r in rollouts])
        reference = self.embed([r.item.thinking or "" for r in rollouts])
        return [max(0.0, float(x)) for x in (ours * reference).sum(-1)]


def build_rewards(config: GRPOConfig, names: Sequence[str], thinking_budget: int | None, device: str = "cpu") -> dict[str, Reward]:
    """The reward functions `names` (those with a weight in some stage), built once for the run."""
    unknown = set(names) - set(REWARDS)
    if unknown:
        raise ValueError(f"unknown rewards {sorted(unknown)}; known: {REWARDS}")
    makers = {
        "answer": lambda: answer_reward,
        "format": lambda: format_reward,
        "length": lambda: length_reward(thinking_budget),
        "judge": lambda: JudgeReward(config.judge),
        "embedding": lambda: EmbeddingReward(TextEmbedder(config.embedding_model, device)),
    }
    return {name: makers[name]() for name in names}
