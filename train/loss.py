"""The SFT loss: the model's own cross-entropy, or the same loss computed a chunk of target tokens at a time.

With a 152,064-word vocabulary the model's loss holds, at the start of backward, ~12 bytes per
vocabulary entry per position (fp32 log-softmax output, its gradient, the logits' gradient): 15 GB
for one 8,192-token sample (train/memory.py). `ChunkedLoss` (`train.loss_chunk_tokens`) takes the
thinker's last hidden states instead (its lm_head is handed an empty slice, so no full logits are
made), keeps only the positions that have a target, and computes lm_head + cross-entropy over
`chunk_tokens` of them at a time under activation checkpointing: each chunk's logits live only
while that chunk is computed, in forward and again in backward.

Both give sum(token losses) / `num_items_in_batch`, the per-target-token normalisation of the whole
global batch that train/sft.py relies on; loss and gradients are equal (tests/test_memory.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from core.qwen_omni import IGNORE_INDEX


def model_loss(model, inputs: dict, num_items_in_batch: torch.Tensor) -> torch.Tensor:
    """The thinker's own loss: sum of token cross-entropies over all positions / `num_items_in_batch`."""
    return model(**inputs, use_cache=False, num_items_in_batch=num_items_in_batch).loss


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

    total = sum(
        checkpoint(chunk_loss, rows[start:start + chunk_tokens], goal[start:start + chunk_tokens], use_reentrant=False)
        for start in range(0, goal.numel(), chunk_tokens)
    )
    return total / num_items_in_batch.to(total.device)


class ChunkedLoss:
    """`model_loss` computed from the last hidden states, `chunk_tokens` target tokens at a time.

    A forward pre-hook on the thinker's lm_head (registered once, on the unwrapped model) takes its
    input, the final hidden states, and hands the lm_head an empty slice while the model runs.
    """

    def __init__(self, model, chunk_tokens: int):
        self.lm_head = model.get_output_embeddings()
        self.chunk_tokens = chunk_tokens
        self._capturing = False
        self._hidden: torch.Tensor | None = None
        self.lm_head.register_forward_pre_hook(self._capture)

    def _capture(self, module, args):
        if not self._capturing:
            return None  # the chunks' own lm_head calls (and their recomputation) pass through
        self._hidden = args[0]
        return (args[0][..., :0, :],)

    def __call__(self, model, inputs: dict, num_items_in_batch: torch.Tensor) -> torch.Tensor:
        labels = inputs["labels"]
        self._capturing = True
        try:
            model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
        finally:
            self._capturing = False
        hidden, self._hidden = self._hidden, None
        if hidden is None:
            raise RuntimeError("the thinker's lm_head was not called: cannot take its hidden states")
        return chunked_cross_entropy(self.lm_head, hidden, labels, self.chunk_tokens, num_items_in_batch)


def make_loss(model, chunk_tokens: int | None):
    """The loss function `train_step` calls: the model's own, or chunked when `chunk_tokens` is set."""
    return ChunkedLoss(model, chunk_tokens) if chunk_tokens else model_loss
