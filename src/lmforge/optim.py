"""Optimizers, parameter groups and learning-rate schedules, chosen by name from TrainConfig.

Every group carries its own peak learning rate (`peak_lr`): the base lr (or Muon's) times the
group's multipliers. The schedule is a factor of the peak applied to every group at every step by
`set_lr`, so it needs no state of its own: resuming at step s gives the lr of step s. What a resumed run
that extends max_steps does with its schedule is recorded in the config too (`extend_schedule`).
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


def clamped_warmup(warmup: int, length: int) -> int:
    """The warmup a schedule of `length` steps runs: `warmup` where it is shorter than the schedule, else a
    tenth of the schedule, rounded down (a smoke test with max_steps 2 trains instead of being refused)."""
    return warmup if warmup < length else length // 10


def schedule_phase(step: int, tc) -> tuple[int, int]:
    """(first step, horizon) of the schedule that optimizer step `step` runs in: the run's own, from 0 to
    train.schedule_steps (max_steps where that is 0), or the latest of train.schedule_restarts at or before
    `step`. A resumed run that extends max_steps keeps its horizon unless it restarts (`extend_schedule`)."""
    start, horizon = 0, tc.schedule_steps or tc.max_steps
    for restart, restart_horizon in tc.schedule_restarts:
        if restart <= step:
            start, horizon = restart, restart_horizon
    return start, horizon


def lr_factor(step: int, tc) -> float:
    """The schedule at optimizer step `step` (0-based) as a fraction of the peak. Counting s and S from the
    start of the step's schedule (`schedule_phase`: 0 and the horizon, normally max_steps), with W its
    warmup (`clamped_warmup`) and the floor f = min_lr / lr:

    - warmup: (s + 1) / W for s < W, reaching the peak at s = W - 1;
    - constant: 1;
    - linear / cosine: from 1 at s = W down to f at s = S - 1 (cosine: f + (1 - f)(1 + cos(pi t)) / 2);
    - wsd (warmup-stable-decay): 1 until the last `decay_fraction` of the post-warmup steps, then
      linear down to f at s = S - 1;
    - inverse_sqrt: sqrt(max(W, 1) / (s + 1)), never below f (the original Transformer's, whose
      peak is at the end of warmup).

    Past the horizon (a run extended without a restart) linear, cosine and wsd stay at f, constant at 1,
    and inverse_sqrt goes on decaying.
    """
    start, horizon = schedule_phase(step, tc)
    step, length = step - start, horizon - start
    warmup = clamped_warmup(tc.warmup_steps, length)
    if step < warmup:
        return (step + 1) / warmup
    floor = tc.min_lr / tc.lr
    if tc.schedule == "constant":
        return 1.0
    if tc.schedule == "inverse_sqrt":
        return max(floor, math.sqrt(max(warmup, 1) / (step + 1)))
    decay_start = warmup
    if tc.schedule == "wsd":
        decay_start = length - round(tc.decay_fraction * (length - warmup))
    progress = min(1.0, max(0.0, (step - decay_start) / max(1, length - 1 - decay_start)))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if tc.schedule == "cosine" else 1 - progress
    return floor + (1 - floor) * shape


def start_schedule(tc) -> list[str]:
    """Record a fresh run's schedule in `tc` before config.yaml is written, so a resume finds it: its horizon
    (train.schedule_steps, max_steps where 0) and the warmup it runs (`clamped_warmup`). Returns the notes to
    print: a warmup that was clamped, a horizon other than max_steps."""
    notes = []
    if tc.schedule_steps and tc.schedule_steps != tc.max_steps:  # e.g. a config.yaml repeated with more steps
        notes.append(f"the schedule's horizon is train.schedule_steps = {tc.schedule_steps}, not train.max_steps = "
                     f"{tc.max_steps} (0 = max_steps)")
    tc.schedule_steps = tc.schedule_steps or tc.max_steps
    warmup = clamped_warmup(tc.warmup_steps, tc.schedule_steps)
    if warmup != tc.warmup_steps:
        notes.append(f"train.warmup_steps = {tc.warmup_steps} is not below the schedule's {tc.schedule_steps} steps; "
                     f"warming up for {warmup} step{'' if warmup == 1 else 's'} (a tenth of them, rounded down) instead")
        tc.warmup_steps = warmup
    return notes


def extend_schedule(tc, step: int) -> str | None:
    """A run resumed at optimizer step `step` whose max_steps reaches past its schedule's horizon: the
    schedule is kept (`lr_factor` past the horizon), or with train.schedule_restart a new one starts at
    `step` (recorded in train.schedule_restarts, so the lr stays a function of the config). Returns what
    happens, for the resume line; None where max_steps stays within the horizon."""
    tc.schedule_steps = tc.schedule_steps or tc.max_steps  # a run saved before the horizon was recorded
    _, horizon = schedule_phase(step, tc)
    first = max(step, horizon)  # 0-based: the first step past both the horizon and the checkpoint
    if tc.max_steps <= first:
        return None
    extending = f"from {horizon} to {tc.max_steps} steps: "
    if tc.schedule_restart:
        tc.schedule_restarts = [*tc.schedule_restarts, [step, tc.max_steps]]
        warmup = clamped_warmup(tc.warmup_steps, tc.max_steps - step)
        return extending + (f"train.schedule_restart starts a new schedule at step {step + 1}: {warmup} warmup steps "
                            f"to lr {tc.lr:g}, then {tc.schedule} to step {tc.max_steps}")
    return extending + (f"the schedule keeps its horizon of {horizon} steps; steps {first + 1}-{tc.max_steps} "
                        f"{_past_horizon(tc)} (train.schedule_restart true starts a new warmup and decay)")


def _past_horizon(tc) -> str:
    """What the steps past a kept schedule's horizon run at (`lr_factor`)."""
    if tc.schedule == "constant":
        return f"run at the constant lr {tc.lr:g}"
    if tc.schedule == "inverse_sqrt":
        return "continue the inverse-square-root decay"
    return f"run at min_lr {tc.min_lr:g}"


def lr_at(step: int, tc) -> float:
    """The base learning rate (`tc.lr`) at step `step`."""
    return tc.lr * lr_factor(step, tc)


def set_lr(optimizer, step: int, tc) -> None:
    """Set every group's lr for optimizer step `step`: its peak times the schedule."""
    factor = lr_factor(step, tc)
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor
