"""Optimizer and learning-rate schedule factories."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: not on biases, norm weights or embeddings (a tied output
    head is the embedding, so it is not decayed either). Each parameter lands in exactly one group."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or id(p) in embedding_ids else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, tc) -> torch.optim.Optimizer:
    device = next(model.parameters()).device
    # The fused kernel does the whole update in one pass over memory; it exists for CPU and CUDA.
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                             eps=tc.eps, fused=fused)


def lr_at(step: int, tc) -> float:
    """The learning rate of the optimizer step `step` (0-based): linear warmup from lr/warmup to lr over
    `warmup_steps`, then `schedule` down to `min_lr` at the last step."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.schedule == "constant":
        return tc.lr
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - 1 - tc.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if tc.schedule == "cosine" else 1 - progress
    return tc.min_lr + (tc.lr - tc.min_lr) * shape


def build_schedule(optimizer: torch.optim.Optimizer, tc) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, tc) / tc.lr)
