"""The training losses: SFT's cross-entropy (the model's own, or computed a chunk of target tokens at a
time), GRPO's per-token log-probabilities (likewise, whole or chunked) and its clipped objective on them.

With a 152,064-word vocabulary the model's loss holds, at the start of backward, ~12 bytes per
vocabulary entry per position (fp32 log-softmax output, its gradient, the logits' gradient): 15 GB
for one 8,192-token sample (train/memory.py). The chunked forms (`train.loss_chunk_tokens`) take the
thinker's last hidden states instead (its lm_head is handed an empty slice, so no full logits are
made), keep only the positions that have a target, and compute lm_head + the token scores over
`chunk_tokens` of them at a time under activation checkpointing: each chunk's logits live only
while that chunk is computed, in forward and again in backward.

The SFT losses give sum(token losses) / `num_items_in_batch`, the per-target-token normalisation of
the whole global batch that train/runtime.py's optimizer step relies on. Whole or chunked, the
values and gradients are equal (tests/test_memory.py, tests/test_grpo.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from core.qwen_omni import IGNORE_INDEX


def model_loss(model, inputs: dict, num_items_in_batch: torch.Tensor) -> torch.Tensor:
    """The thinker's own loss: sum of token cross-entropies over all positions / `num_items_in_batch`."""
    return model(**inputs, use_cache=False, num_items_in_batch=num_items_in_batch).loss


def checkpointed_chunks(fn, rows: torch.Tensor, goal: torch.Tensor, chunk_tokens: int) -> list[torch.Tensor]:
    """`fn(rows, goal)` over `chunk_tokens` target positions at a time, each chunk recomputed in backward: only
    one chunk's logits exist at once."""
    return [checkpoint(fn, rows[start:start + chunk_tokens], goal[start:start + chunk_tokens], use_reentrant=False)
            for start in range(0, goal.numel(), chunk_tokens)]


def chunked_cross_entropy(lm_head, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                          num_items_in_batch: torch.Tensor) -> torch.Tensor:
    """Sum of the next-token cross-entropies of the target positions / `num_items_in_batch`.

    `hidden` [batch, seq, hidden] are the final (normed) hidden states; position t predicts
    labels[t + 1], as in the model's loss; the logits are upcast to fp32 as there.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    rows, goal = hidden[:, :-1][keep], targets[keep]
    if goal.numel() == 0:  # a micro-batch without targets still takes part in backward (ranks stay in step)
        return hidden.sum().float() * 0.0

    def chunk_loss(rows_chunk: torch.Tensor, goal_chunk: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(lm_head(rows_chunk).float(), goal_chunk, reduction="sum")

    total = sum(checkpointed_chunks(chunk_loss, rows, goal, chunk_tokens))
    return total / num_items_in_batch.to(total.device)


class LastHiddenStates:
    """Runs the thinker and returns the final (normed) hidden states its lm_head was given, instead of logits.

    A forward pre-hook on the thinker's lm_head (registered once, on the unwrapped model) takes its
    input and hands the lm_head an empty slice while the model runs; other calls (a chunk's, its
    recomputation, generation) pass through.
    """

    def __init__(self, model):
        self.lm_head = model.get_output_embeddings()
        self._capturing = False
        self._hidden: torch.Tensor | None = None
        self.lm_head.register_forward_pre_hook(self._capture)

    def _capture(self, module, args):
        if not self._capturing:
            return None
        self._hidden = args[0]
        return (args[0][..., :0, :],)

    def __call__(self, model, inputs: dict) -> torch.Tensor:
        self._capturing = True
        try:
            model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
        finally:
            self._capturing = False
        hidden, self._hidden = self._hidden, None
        if hidden is None:
            raise RuntimeError("the thinker's lm_head was not called: cannot take its hidden states")
        return hidden


class ChunkedLoss:
    """`model_loss` computed from the last hidden states, `chunk_tokens` target tokens at a time."""

    def __init__(self, model, chunk_tokens: int):
        self.hidden_states = LastHiddenStates(model)
        self.chunk_tokens = chunk_tokens

    def __call__(self, model, inputs: dict, num_items_in_batch: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden_states(model, inputs)
        return chunked_cross_entropy(self.hidden_states.lm_head, hidden, inputs["labels"], self.chunk_tokens,
                                     num_items_in_batch)


def make_loss(model, chunk_tokens: int | None):
    """SFT's loss function: the model's own, or chunked when `chunk_tokens` is set."""
    return ChunkedLoss(model, chunk_tokens) if chunk_tokens else model_loss


def token_logps(model, batch: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each next token under `model` at the sampling temperature, mask of completion tokens),
    both [B, T-1]: position t scores token t+1; 0 where the mask is off."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float() / temperature
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    # gather - logsumexp: no second [B, T, vocab] tensor as log_softmax would make
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked - torch.logsumexp(logits, dim=-1)) * mask, mask


def chunked_token_logps(lm_head, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                        temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logps` from the final hidden states [B, T, hidden], `chunk_tokens` target positions at a time."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    rows, goal = hidden[:, :-1][mask], targets[mask]
    logps = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    if goal.numel() == 0:  # a micro-batch without targets still takes part in backward (ranks stay in step)
        return logps + hidden.sum().float() * 0.0, mask

    def chunk_logps(rows_chunk: torch.Tensor, goal_chunk: torch.Tensor) -> torch.Tensor:
        logits = lm_head(rows_chunk).float() / temperature
        return logits.gather(-1, goal_chunk.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    picked = torch.cat(checkpointed_chunks(chunk_logps, rows, goal, chunk_tokens))
    return logps.masked_scatter(mask, picked), mask


class ChunkedTokenLogps:
    """`token_logps` computed from the last hidden states, `chunk_tokens` target tokens at a time."""

    def __init__(self, model, chunk_tokens: int):
        self.hidden_states = LastHiddenStates(model)
        self.chunk_tokens = chunk_tokens

    def __call__(self, model, batch: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.hidden_states(model, batch)
        return chunked_token_logps(self.hidden_states.lm_head, hidden, batch["labels"], self.chunk_tokens, temperature)


def make_token_logps(model, chunk_tokens: int | None):
    """GRPO's per-token log-probabilities: from the model's logits, or chunked when `chunk_tokens` is set."""
    return ChunkedTokenLogps(model, chunk_tokens) if chunk_tokens else token_logps


# ---------------------------------------------------------------- GRPO's objective (pure functions)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Reward minus its group's mean (and divided by the group's std when `scale == "group"`).

    `rewards` holds consecutive groups of `group_size` completions of the same prompt. A group whose
    completions all score the same gets advantage 0: it carries no signal about which is better.
    """
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale != "none":
        raise ValueError(f"unknown reward scaling {scale!r}")
    return centred.reshape(-1)


@dataclass
class LossParts:
    loss: torch.Tensor  # this micro-batch's share of the global loss (grpo.loss_type's normalisation)
    kl_sum: float  # sums over this micro-batch's completion tokens (divided by the global count in the log)
    clipped: int
    tokens: int


@dataclass(frozen=True)
class Normalisation:
    """How `grpo.loss_type` turns token losses into the global batch's loss (as TRL's GRPOTrainer 1.16 does):

    - `dapo`: sum over every completion token of the global batch / its `tokens` (token-level; a long
      completion weighs by its length);
    - `grpo`: each completion's mean over its own tokens, then the mean over the global batch's `sequences`
      (a token of a short completion weighs more than one of a long one);
    - `dr_grpo`: sum over every completion token / (`sequences` x `max_length`, grpo.max_new_tokens): a
      constant, so neither the length bias of `grpo` nor a step size that varies with the batch's tokens.

    Every form is a sum over micro-batches (and ranks) of their shares, so gradient accumulation and data
    parallelism give the whole batch's gradient.
    """

    loss_type: str
    tokens: int | torch.Tensor  # completion tokens of the global batch
    sequences: int = 0  # completions of the global batch
    max_length: int = 0  # grpo.max_new_tokens

    def __post_init__(self):
        if self.loss_type not in ("dapo", "grpo", "dr_grpo"):
            raise ValueError(f"unknown grpo.loss_type {self.loss_type!r}")
        if self.loss_type != "dapo" and self.sequences <= 0:
            raise ValueError(f"loss_type {self.loss_type} needs the global batch's number of sequences")
        if self.loss_type == "dr_grpo" and self.max_length <= 0:
            raise ValueError("loss_type dr_grpo needs the maximal completion length")

    def __call__(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of the loss; `mask` float [B, T]."""
        if self.loss_type == "grpo":
            return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / self.sequences
        if self.loss_type == "dr_grpo":
            return (per_token * mask).sum() / (self.sequences * self.max_length)
        return (per_token * mask).sum() / self.tokens


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              total_tokens: int | torch.Tensor | Normalisation, clip_low: float, clip_high: float,
              ref_logps: torch.Tensor | None = None, beta: float = 0.0, level: str = "token",
              rollout_weights: torch.Tensor | None = None) -> LossParts:
    """Clipped-ratio policy loss (+ beta x KL) over masked tokens, normalised as `total_tokens` says (a
    `Normalisation`, or a token count: the `dapo` form).

    logps/old_logps/ref_logps/mask: [B, T] per completion token; advantages: [B]. The ratio is per token
    (`level="token"`, GRPO), or per sequence (`"sequence"`, GSPO, arXiv 2507.18071): exp of the mean
    token log-ratio of the completion, clipped as one number for all its tokens, so one token's routing
    or precision noise no longer decides its own clip. `rollout_weights` [B, T] (detached) multiply
    each token's policy term: truncated importance sampling of the trainer's policy against the engine
    that sampled (train/grpo.py). The KL estimate per token is exp(ref - logp) - (ref - logp) - 1
    (non-negative, unbiased; Schulman's k3).
    """
    norm = total_tokens if isinstance(total_tokens, Normalisation) else Normalisation("dapo", total_tokens)
    mask = mask.to(logps.dtype)
    log_ratio = logps - old_logps
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0))
        log_ratio = log_ratio.expand_as(logps)
    elif level != "token":
        raise ValueError(f"unknown importance sampling level {level!r}")
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(1)
    clipped_ratio = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)
    if rollout_weights is not None:
        per_token = per_token * rollout_weights
    kl_sum = 0.0
    if beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probabilities")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        kl_sum = float((kl.detach() * mask).sum())
    # A token is clipped when the clipped term is the smaller one, i.e. its gradient is cut off.
    clipped = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
    return LossParts(
        loss=norm(per_token, mask), kl_sum=kl_sum,
        clipped=int((clipped.float() * mask).sum()), tokens=int(mask.sum()),
    )


def truncated_importance_weights(trainer_logps: torch.Tensor, rollout_logps: torch.Tensor, cap: float) -> torch.Tensor:
    """min(p_trainer / p_rollout, cap) per token, detached: the correction for tokens sampled by an engine
    whose probabilities differ from the trainer's (another kernel, precision or weight copy), truncated so
    one token the engine found unlikely cannot dominate the step (TIS, Yao et al. 2025)."""
    return torch.exp(trainer_logps.detach() - rollout_logps).clamp(max=cap)
