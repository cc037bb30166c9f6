"""Losses. Each returns the loss *summed* over real targets; the training loop divides by the real
target count of the whole (accumulated) step."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # targets with this id carry no loss

CHUNK_ELEMENTS = 1 << 21  # logits per chunk (8 MiB in fp32) for the chunked output loss
CHUNK_ABOVE = 1 << 22  # use chunks when the full logits would exceed this many elements (16 MiB in fp32)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over targets != IGNORE_INDEX. logits [N, V] (bf16/fp16 upcast to fp32), targets [N]."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return cross_entropy_sum(hidden @ weight.t(), targets)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunked: bool = True) -> torch.Tensor:
    """Cross-entropy of the output projection `hidden @ weight.T`, summed over real targets.

    hidden [N, d], weight [V, d], targets [N]. When the [N, V] logits would be large, rows are processed
    in chunks under activation checkpointing: each chunk's logits exist only while that chunk is
    computed (and recomputed in backward), so the loss holds O(chunk * V) memory instead of
    O(N * V), for one extra output-projection matmul.
    """
    n, vocab = targets.numel(), weight.shape[0]
    if not chunked or n * vocab <= CHUNK_ABOVE:
        return _chunk_loss(hidden, weight, targets)
    rows = max(1, CHUNK_ELEMENTS // vocab)
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, n, rows):
        h, t = hidden[start:start + rows], targets[start:start + rows]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, h, weight, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, weight, t)
    return total
