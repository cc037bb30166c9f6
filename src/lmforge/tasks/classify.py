"""Sentence (and sentence-pair) tasks: classification, regression and multi-label classification. One
pooled vector per example goes through a linear head; the three differ in the head's size, the loss
and the metrics."""

from __future__ import annotations

import torch

from lmforge.data.labelled import Example
from lmforge.losses import LOSSES, loss_options
from lmforge.metrics import ClassificationMetrics, MultiLabelMetrics, RegressionMetrics
from lmforge.tasks.finetune import Encoded, FinetuneTask


class SequenceTask(FinetuneTask):
    def encode_all(self, examples: list[Example], path: str) -> list[Encoded]:
        tok = self.tokenizer
        first = tok.encode_batch([e.text for e in examples], add_special_tokens=False)
        has_pair = any(e.pair is not None for e in examples)
        second = tok.encode_batch([e.pair or "" for e in examples], add_special_tokens=False) if has_pair else None
        return [self.join(first[i].ids, second[i].ids if second is not None and e.pair is not None else None)
                for i, e in enumerate(examples)]

    def join(self, a: list[int], b: list[int] | None = None) -> Encoded:
        """A sentence's token ids, or a pair's, as the model reads them: [CLS] a [SEP] (b [SEP]) for an encoder,
        a (eos b) eos for a decoder, cut longest-first to max_length; segment 1 marks b."""
        if self.encoder:
            start, mid, end = [self.cls_id] if self.cls_id is not None else [], [self.sep_id], [self.sep_id]
        else:
            start, mid, end = [], [self.eos_id], [self.eos_id]
        mid, end = [i for i in mid if i is not None], [i for i in end if i is not None]
        budget = self.max_length - len(start) - len(end) - (len(mid) if b is not None else 0)
        if b is None:
            a = a[:budget]
            return Encoded(start + a + end, [0] * (len(start) + len(a) + len(end)))
        while len(a) + len(b) > budget:  # longest first
            if len(a) >= len(b):
                a = a[:-1]
            else:
                b = b[:-1]
        head = start + a + mid
        return Encoded(head + b + end, [0] * len(head) + [1] * (len(b) + len(end)))

    def targets(self, rows, examples) -> dict[str, torch.Tensor]:
        return {"label": self.label_tensor(examples)}

    def label_tensor(self, examples: list[Example]) -> torch.Tensor:
        """The batch's gold values as the loss takes them: class indices here, numbers (regress), 0/1 rows
        (multilabel)."""
        path = self.fc_path("train")
        if examples[0].label is None:
            return torch.zeros(len(examples), dtype=torch.long, device="cpu")  # prediction inputs without labels
        return torch.tensor([self.labels.index(e.label, e, path) for e in examples], device="cpu")

    def loss_from(self, outputs, batch) -> torch.Tensor:
        fn = LOSSES[self.cfg.loss.name]
        return fn(outputs, batch["label"], reduction="sum", **loss_options(self.cfg.loss, outputs.device))

    def count(self, batch) -> int:
        return int(batch["label"].shape[0])


class ClassifyTask(SequenceTask):
    name = "classify"
    default_metric = "accuracy"

    def metric_names(self):
        return ["loss", "accuracy", "macro_f1", "micro_f1", "weighted_f1", "macro_precision", "macro_recall"]

    def result_metrics(self):
        return ("accuracy", "macro_f1")

    def new_metrics(self):
        return ClassificationMetrics(self.labels.labels)

    def update_metrics(self, metrics, outputs, batch, rows, examples) -> None:
        metrics.update(outputs.argmax(-1).cpu(), batch["label"].cpu())

    def predictions(self, outputs, batch, rows, examples) -> list[dict]:
        probs = outputs.softmax(-1).cpu()
        names = self.labels.labels
        return [{"text": e.text, **({"pair": e.pair} if e.pair is not None else {}), "label": names[int(p.argmax())],
                 "probs": {n: round(float(q), 6) for n, q in zip(names, p)}} for e, p in zip(examples, probs)]


class RegressTask(SequenceTask):
    name = "regress"
    default_metric = "pearson"

    def label_map(self, train, dev):
        return None

    def label_tensor(self, examples):
        return torch.tensor([float(e.label) if e.label is not None else 0.0 for e in examples], device="cpu")

    def outputs(self, model, batch):
        return super().outputs(model, batch).squeeze(-1)

    def metric_names(self):
        return ["loss", "mse", "mae", "rmse", "pearson", "spearman"]

    def result_metrics(self):
        return ("mse", "pearson", "spearman")

    def new_metrics(self):
        return RegressionMetrics()

    def update_metrics(self, metrics, outputs, batch, rows, examples) -> None:
        metrics.update(outputs.cpu(), batch["label"].cpu())

    def predictions(self, outputs, batch, rows, examples) -> list[dict]:
        values = outputs.cpu()
        return [{"text": e.text, **({"pair": e.pair} if e.pair is not None else {}), "value": float(v)}
                for e, v in zip(examples, values)]


class MultiLabelTask(SequenceTask):
    name = "multilabel"
    default_metric = "micro_f1"

    def label_tensor(self, examples):
        out = torch.zeros(len(examples), len(self.labels.labels), device="cpu")
        path = self.fc_path("train")
        for i, e in enumerate(examples):
            for label in e.label or []:
                out[i, self.labels.index(label, e, path)] = 1.0
        return out

    def count(self, batch) -> int:
        return int(batch["label"].numel())  # the loss sums over every (example, label)

    def thresholds(self, device) -> torch.Tensor:
        t = self.cfg.finetune.thresholds or [0.5] * len(self.labels.labels)
        return torch.tensor(t, device=device)

    def metric_names(self):
        return ["loss", "micro_f1", "macro_f1", "micro_precision", "micro_recall", "subset_accuracy"]

    def result_metrics(self):
        return ("micro_f1", "macro_f1", "subset_accuracy")

    def new_metrics(self):
        return MultiLabelMetrics(self.labels.labels)

    def update_metrics(self, metrics, outputs, batch, rows, examples) -> None:
        probs = outputs.sigmoid()
        metrics.update((probs >= self.thresholds(probs.device)).cpu(), batch["label"].bool().cpu())

    def predictions(self, outputs, batch, rows, examples) -> list[dict]:
        probs = outputs.sigmoid()
        chosen = (probs >= self.thresholds(probs.device)).cpu()
        names = self.labels.labels
        return [{"text": e.text, **({"pair": e.pair} if e.pair is not None else {}),
                 "labels": [n for n, c in zip(names, row) if c],
                 "probs": {n: round(float(q), 6) for n, q in zip(names, p)}}
                for e, row, p in zip(examples, chosen, probs.cpu())]
