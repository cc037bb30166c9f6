"""Token classification (NER): a tag per word. Words are split into sub-word tokens; the first
sub-token of each word carries the word's tag and the rest are ignored by the loss, and predictions
are read back at the first sub-tokens, so metrics and outputs are per word (entity-level F1 by
seqeval)."""

from __future__ import annotations

import torch

from lmforge.data.batches import pad_batch
from lmforge.data.labelled import Example, align_words
from lmforge.losses import IGNORE_INDEX, LOSSES, loss_options
from lmforge.metrics import EntityMetrics
from lmforge.tasks.finetune import Encoded, FinetuneTask


class TagTask(FinetuneTask):
    name = "tag"
    default_metric = "entity_f1"

    def encode_all(self, examples: list[Example], path: str) -> list[Encoded]:
        rows = []
        cls, sep = (self.cls_id, self.sep_id) if self.encoder else (None, None)
        for e in examples:
            tags = [self.labels.index(t, e, path) for t in e.label] if e.label is not None else None
            ids, target, starts = align_words(self.tokenizer, e.text, tags, self.max_length, cls, sep, IGNORE_INDEX)
            rows.append(Encoded(ids, None, target, starts))
        return rows

    def targets(self, rows, examples) -> dict[str, torch.Tensor]:
        return {"target": pad_batch([r.target for r in rows], IGNORE_INDEX)}

    def loss_from(self, outputs, batch) -> torch.Tensor:
        return LOSSES[self.cfg.loss.name](outputs.flatten(0, 1), batch["target"].flatten(), reduction="sum",
                                          **loss_options(self.cfg.loss, outputs.device))

    def metric_names(self):
        return ["loss", "entity_f1", "entity_precision", "entity_recall", "token_accuracy"]

    def result_metrics(self):
        return ("entity_f1", "entity_precision", "entity_recall")

    def new_metrics(self):
        return EntityMetrics(self.labels.scheme)

    def word_tags(self, logits: torch.Tensor, rows: list[Encoded]) -> list[list[str]]:
        """Each example's predicted tag per word ('O' for a word cut off by max_length)."""
        pred = logits.argmax(-1).cpu()
        names = self.labels.labels
        return [[names[int(pred[i, s])] if s >= 0 else "O" for s in r.word_starts] for i, r in enumerate(rows)]

    def update_metrics(self, metrics, outputs, batch, rows, examples) -> None:
        # whole sentences: a word cut off by max_length is predicted 'O' and still scored
        metrics.update(self.word_tags(outputs, rows), [e.label for e in examples])

    def predictions(self, outputs, batch, rows, examples) -> list[dict]:
        return [{"words": e.text, "tags": tags} for e, tags in zip(examples, self.word_tags(outputs, rows))]

