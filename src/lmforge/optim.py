"""Optimizers, parameter groups and learning-rate schedules, chosen by name from TrainConfig.

Every group carries its own peak learning rate (`peak_lr`): the base lr (or Muon's) times the
group's multipliers. The schedule is a factor of the peak applied to every group at every step by
`set_lr`, so it needs no state of its own: resuming at step s gives the lr of step s.
"""

from __future__ import annotations

import math
import re
from fnmatch import fnmatchcase

import torch
from torch import nn

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")  # the layer number in names like blocks.3.attn.qkv.weight


def _is_head(name: str) -> bool:
    """An output head's parameter (head.weight, lm_head.weight, cls_head.bias)."""
    return any(part.endswith("head") for part in name.split(".")[:-1])


def _layer_of(name: str, is_embedding: bool, n_layers: int) -> int:
    """0 for embeddings, i + 1 for the i-th block, n_layers + 1 for what sits above the blocks."""
    if is_embedding or "emb" in name:
        return 0
    m = _LAYER.search(name)
    return int(m.group(1)) + 1 if m else n_layers + 1


def param_groups(model: nn.Module, tc) -> list[dict]:
    """The optimizer's parameter groups, each parameter in exactly one.

    - weight decay on weight matrices only: not on biases, norm weights or embeddings (a tied output
      head is the embedding, so it is not decayed either);
    - with optimizer = muon, 2-D hidden matrices go to Muon; embeddings, output heads, norms and
      biases to AdamW;
    - lr multipliers: `layer_decay`^(L + 1 - layer) (layer-wise decay, ELECTRA-style), times every
      `lr_scale` pattern (fnmatch on the parameter name) that matches.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # shared parameters once
    n_layers = max((int(m.group(1)) + 1 for n, _ in named if (m := _LAYER.search(n))), default=0)
    groups: dict[tuple, dict] = {}
    for name, p in named:
        embedding = id(p) in embedding_ids
        decay = p.ndim >= 2 and not embedding
        muon = tc.optimizer == "muon" and p.ndim == 2 and not embedding and not _is_head(name)
        scale = tc.layer_decay ** (n_layers + 1 - _layer_of(name, embedding, n_layers))
        for pattern, factor in tc.lr_scale.items():
            if fnmatchcase(name, pattern):
                scale *= factor
        key = ("muon" if muon else "adam", decay, scale)
        if key not in groups:
            base = tc.muon_lr if muon else tc.lr
            groups[key] = {"params": [], "param_names": [], "weight_decay": tc.weight_decay if decay else 0.0,
                           "kind": key[0], "peak_lr": base * scale, "lr": base * scale}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())


class OptimizerChain:
    """Several optimizers stepped as one (Muon for the hidden matrices, AdamW for the rest), with the
    interface the training loop uses: param_groups, step, zero_grad, state_dict, load_state_dict."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"chain": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizers, state["chain"], strict=True):
            o.load_state_dict(s)


def build_optimizer(model: nn.Module, tc) -> torch.optim.Optimizer | OptimizerChain:
    groups = param_groups(model, tc)
    device = next(model.parameters()).device
    fused = device.type in ("cpu", "cuda")  # one pass over memory per step; Adam(W) has it on CPU and CUDA
    name = tc.optimizer
    if name == "muon":
        muon = [g for g in groups if g["kind"] == "muon"]
        rest = [g for g in groups if g["kind"] != "muon"]
        parts = [torch.optim.Muon(muon, lr=tc.muon_lr, momentum=tc.muon_momentum, nesterov=True,
                                  weight_decay=tc.weight_decay)] if muon else []
        if rest:
            parts.append(torch.optim.AdamW(rest, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, fused=fused))
        return OptimizerChain(*parts)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, fused=fused)
    if name == "adam":  # weight decay as an L2 term in the gradient (Adam's original coupling)
        return torch.optim.Adam(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum, dampening=tc.dampening, nesterov=tc.nesterov)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=tc.lr, alpha=tc.beta2, eps=tc.eps, momentum=tc.momentum)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=tc.lr, eps=tc.eps)
    raise ValueError(f"unknown optimizer {name!r}")  # the config's choices make this unreachable


def lr_factor(step: int, tc) -> float:
    """The schedule at optimizer step `step` (0-based) as a fraction of the peak. With W = warmup_steps,
    S = max_steps and the floor f = min_lr / lr:

    - warmup: (step + 1) / W for step < W, reaching the peak at step W - 1;
    - constant: 1;
    - linear / cosine: from 1 at step W down to f at step S - 1 (cosine: f + (1 - f)(1 + cos(pi t)) / 2);
    - wsd (warmup-stable-decay): 1 until the last `decay_fraction` of the post-warmup steps, then
      linear down to f at step S - 1;
    - inverse_sqrt: sqrt(max(W, 1) / (step + 1)), never below f (the original Transformer's, whose
      peak is at the end of warmup).
    """
    if step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    floor = tc.min_lr / tc.lr
    if tc.schedule == "constant":
        return 1.0
    if tc.schedule == "inverse_sqrt":
        return max(floor, math.sqrt(max(tc.warmup_steps, 1) / (step + 1)))
    start = tc.warmup_steps
    if tc.schedule == "wsd":
        start = tc.max_steps - round(tc.decay_fraction * (tc.max_steps - tc.warmup_steps))
    progress = min(1.0, max(0.0, (step - start) / max(1, tc.max_steps - 1 - start)))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if tc.schedule == "cosine" else 1 - progress
    return floor + (1 - floor) * shape


def lr_at(step: int, tc) -> float:
    """The base learning rate (`tc.lr`) at step `step`."""
    return tc.lr * lr_factor(step, tc)


def set_lr(optimizer, step: int, tc) -> None:
    """Set every group's lr for optimizer step `step`: its peak times the schedule."""
    factor = lr_factor(step, tc)
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor
