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
    loss: torch.Tensor  # this micro-batch's share of the global per-token mean
    kl_sum: float  # sums over this micro-batch's completion tokens (divided by the global count in the log)
    clipped: int
    tokens: int


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              total_tokens: int | torch.Tensor, clip_low: float, clip_high: float,
              ref_logps: torch.Tensor | None = None, beta: float = 0.0) -> LossParts:
    """Clipped-ratio policy loss (+ beta x KL) summed over masked tokens, divided by `total_tokens`.

    logps/old_logps/ref_logps/mask: [B, T] per completion token; advantages: [B]. The KL estimate per
    token is exp(ref - logp) - (ref - logp) - 1 (non-negative, unbiased; Schulman's k3).
    """
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(1)
    clipped_ratio = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)
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
        loss=(per_token * mask).sum() / total_tokens, kl_sum=kl_sum,
        clipped=int((clipped.float() * mask).sum()), tokens=int(mask.sum()),
    )
