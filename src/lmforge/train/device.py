"""Where a run computes: the configured device checked against this machine, and regional compilation
of the model on it. Training, serving and the inference commands all pick their device here."""

from __future__ import annotations

import functools

import torch

from lmforge.errors import UserError
from lmforge.fields import device_name
from lmforge.model.layers import Block


def pick_device(name: str, where: str = "config: train.device") -> torch.device:
    """auto | cpu | cuda | cuda:N | mps -> a device this machine has, or a one-line UserError
    (torch would only fail deep inside the first .to())."""
    ok, accepted = device_name()
    if not ok(name):
        raise UserError(f"{where} = {name!r}: expected {accepted}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{where} = {name}: no CUDA device is available here; use auto or cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"{where} = {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{where} = mps: no MPS device is available here; use auto or cpu")
    return torch.device(name)


def set_compiled(model: torch.nn.Module, on: bool, checkpointed: bool = False) -> bool:
    """Regional compilation: compile the forward of each repeated block (the Transformer layers), which
    compiles faster than the whole model and leaves tasks free to call any model method. With
    `checkpointed`, each block keeps only its input and recomputes the rest in the backward pass
    (activation checkpointing). Returns `on`."""
    from torch.utils.checkpoint import checkpoint

    for module in model.modules():
        if isinstance(module, Block):
            vars(module).pop("forward", None)  # back to the class's eager forward
            forward = torch.compile(module.forward) if on else module.forward
            if checkpointed:
                forward = functools.partial(checkpoint, forward, use_reentrant=False)
            if on or checkpointed:
                module.forward = forward
    return on
