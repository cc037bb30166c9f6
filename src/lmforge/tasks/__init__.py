"""Tasks: what the one training loop needs to know about a kind of training.

A task reads its data, builds its model, turns a batch into a summed loss and a count of the targets
it covers (so accumulation can normalise by real tokens), evaluates, and writes its artefacts.
Adding a task means adding a module here and a line to TASKS.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from lmforge.losses import IGNORE_INDEX
from lmforge.tasks import registry


class Task:
    name = ""
    shard = (0, 1)  # (rank, world size) of this process; the loop sets it before train_batches()
    report_best = False  # the loop reloads the best weights before finish()

    def __init__(self, cfg):
        self.cfg = cfg

    def setup(self) -> None:
        """Read and check the data (raising UserError on bad input); fill derived config such as the
        vocabulary size. Runs before anything is written."""

    def build_model(self, pretrained: bool = False) -> nn.Module:
        """The task's model; pretrained: with the weights the run starts from (fine-tuning), else fresh."""
        raise NotImplementedError

    def train_batches(self, seed: int) -> Iterator[dict]:
        """An endless iterator with state_dict()/load_state_dict() for exact resume; with several
        processes, rank r's share of each global batch (see data.batches.RandomWindows)."""
        raise NotImplementedError

    def eval_batches(self) -> Iterable[dict]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The loss summed over the batch's targets."""
        raise NotImplementedError

    def selection(self) -> tuple[str, bool]:
        """The val metric that picks the best weights and drives early stopping, and whether higher is better."""
        return "loss", False

    def count(self, batch: dict) -> int:
        """How many targets the batch's summed loss covers."""
        return int((batch["target"] != IGNORE_INDEX).sum())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, to_device) -> dict[str, float]:
        total, n = 0.0, 0
        for batch in self.eval_batches():
            total += float(self.loss(model, to_device(batch)))
            n += self.count(batch)
        loss = total / max(n, 1)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": n}

    def flops_per_token(self, model: nn.Module) -> float:
        """Training FLOPs per input token, for MFU."""
        return model.flops_per_token()

    def save_artifacts(self, run_dir: Path) -> None:
        """Files a run directory needs besides weights and config (a tokenizer, label maps)."""

    def finish(self, model: nn.Module, run_dir: Path) -> str:
        """Text printed at the end of a run (samples, a report)."""
        return ""


def make_task(cfg) -> Task:
    """The Task for cfg.task, its class imported from where the registry says (tasks/registry.py)."""
    module, _, cls = registry.spec(cfg.task).task_class.partition(":")
    return getattr(importlib.import_module(module), cls)(cfg)
