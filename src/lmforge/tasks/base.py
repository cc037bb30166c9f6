"""The Task base class: the hooks the one training loop calls (docs/architecture.md, "Adding a task").

A task reads its data and writes what it derived from it into the config in one place (`setup`,
which calls `resolve` once), builds its model (`build_model`), turns a batch into a summed loss
(`loss`) and a count of the targets it covers (`count`, so accumulation can normalise by real tokens),
evaluates (`evaluate`, `selection`), and writes its artefacts (`save_artifacts`, `finish`). The
fine-tuning tasks share more (tasks/finetune.py).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from lmforge.config import Config
from lmforge.data.store import TokenSplits, amount
from lmforge.errors import UserError
from lmforge.losses import IGNORE_INDEX
from lmforge.model.build import build_model
from lmforge.model.config import ModelConfig


class Task:
    name = ""
    shard = (0, 1)  # (rank, world size) of this process; the loop sets it before train_batches()
    # the file finish() writes its report into; with one, the loop reloads the best weights before finish()
    final_report: str | None = None

    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def main(self) -> bool:
        """Rank 0 or the only process: the one that writes files (finish() runs on every rank, since the
        forward passes of a sharded model need them all)."""
        return self.shard[0] == 0

    def setup(self) -> None:
        """Read and check the data (raising UserError on bad input) and find what the config leaves
        to it (such as the vocabulary size), then `resolve()` once. Runs before anything is written;
        afterwards the config is the resolved one."""
        self.resolve()

    def resolve(self) -> Config:
        """Write what setup() found into the config, the one place a task changes it (in place: whoever
        holds the config or one of its sections sees the values), and return it. This is the config
        the run trains with and saves as config.yaml. setup() calls it once."""
        return self.cfg

    def build_model(self, pretrained: bool = False) -> nn.Module:
        """The task's model; pretrained: with the weights the run starts from (fine-tuning, a translation
        from a span run), else fresh. By default the registry's model kind, fresh (model/build.py)."""
        return build_model(self.cfg)

    def train_batches(self, seed: int) -> Iterator[dict]:
        """An endless iterator with state_dict()/load_state_dict() for exact resume; with several
        processes, rank r's share of each global batch (see data.batches.RandomWindows)."""
        raise NotImplementedError

    def eval_batches(self) -> Iterable[dict]:
        """The val batches an evaluation goes through, the same ones each time."""
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
        """The val metrics, the selection() metric among them (by default the mean loss per target)."""
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

    def summary(self) -> str:
        """One line on what setup() read, printed once at the start of a run; "" for none."""
        return ""


def corpus_summary(data: TokenSplits, cfg: Config, window: int | None = None) -> str:
    """A pre-training run's corpus line: what was read, and how many epochs of the train split the run's steps
    cover. A step reads train.batch_size x train.grad_accum windows of `window` corpus tokens (by default
    model.max_seq_len), all processes together (each keeps its slice of the global batch)."""
    tc = cfg.train
    window = window or cfg.model.max_seq_len
    sequences = tc.batch_size * tc.grad_accum
    tokens = tc.max_steps * sequences * window
    return (f"lmforge: corpus {data.summary()}; {tc.max_steps} steps x {sequences} x {window} tokens = "
            f"{amount(tokens)} tokens, {tokens / len(data.train):.3g} epochs")


def follow_tokenizer(model: ModelConfig, vocab: int) -> ModelConfig:
    """The model section sized to a tokenizer of `vocab` tokens: model.vocab_size 0 follows it; a smaller
    one could not embed its ids."""
    if model.vocab_size == 0:
        return dataclasses.replace(model, vocab_size=vocab)
    if model.vocab_size < vocab:
        raise UserError(f"config: model.vocab_size = {model.vocab_size} is smaller than the tokenizer's "
                        f"vocabulary of {vocab}; set it to 0 to follow the tokenizer")
    return model


def at_least_vocab(model: ModelConfig, vocab: int) -> ModelConfig:
    """The model section with room for the ids of a tokenizer of `vocab` tokens."""
    return dataclasses.replace(model, vocab_size=max(model.vocab_size, vocab))
