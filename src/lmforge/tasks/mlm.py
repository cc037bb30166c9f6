"""Masked language modelling (BERT): predict masked tokens from both sides, optionally with
next-sentence prediction."""

from __future__ import annotations

from lmforge.model.transformer import MaskedLM
from lmforge.tasks import Task


class MaskedLMTask(Task):
    name = "mlm"

    def build_model(self) -> MaskedLM:
        return MaskedLM(self.cfg.model, nsp=self.cfg.mlm.nsp)
