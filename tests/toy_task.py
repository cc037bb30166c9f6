"""A task that lives outside lmforge, written by following docs/architecture.md's "Adding a task": one
module and one registry entry, nothing else touched. tests/test_add_a_task.py registers it, then trains,
evaluates, predicts, serves and reports it.

Polarity: is a sentence positive or negative? Besides accuracy it reports balanced accuracy (the mean
recall of the classes, which a majority-class guess cannot raise above 0.5), and that is the metric that
picks its best weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from lmforge.tasks.finetune import Encoded, FinetuneTask
from lmforge.tasks.registry import TaskSpec

SPEC = TaskSpec(
    name="polarity", task_class="toy_task:PolarityTask", doc="is a sentence positive or negative",
    family="finetune", model="sequence_classifier", body="pretrained", losses=("cross_entropy",),
    label="class", formats=("sst", "csv", "tsv", "jsonl"), endpoint="classify")


class BalancedMetrics:
    """Gold and predicted class indices, gathered batch by batch."""

    def __init__(self):
        self.gold, self.predicted = [], []

    def update(self, predicted: torch.Tensor, gold: torch.Tensor) -> None:
        self.predicted += predicted.tolist()
        self.gold += gold.tolist()

    def result(self) -> dict[str, float]:
        return {"accuracy": accuracy_score(self.gold, self.predicted),
                "balanced_accuracy": balanced_accuracy_score(self.gold, self.predicted)}


class PolarityTask(FinetuneTask):
    name = "polarity"
    default_metric = "balanced_accuracy"

    def encode_all(self, examples, path: str) -> list[Encoded]:
        """[CLS] sentence [SEP], cut to max_length (a decoder body: the sentence and its end token)."""
        start = [self.cls_id] if self.encoder and self.cls_id is not None else []
        end = [self.sep_id if self.encoder else self.eos_id]
        texts = self.tokenizer.encode_batch([e.text for e in examples], add_special_tokens=False)
        room = self.max_length - len(start) - len(end)
        return [Encoded(start + t.ids[:room] + end) for t in texts]

    def targets(self, rows, examples) -> dict[str, torch.Tensor]:
        if examples[0].label is None:  # prediction inputs
            return {"label": torch.zeros(len(examples), dtype=torch.long, device="cpu")}
        path = self.fc_path("train")
        return {"label": torch.tensor([self.labels.index(e.label, e, path) for e in examples], device="cpu")}

    def count(self, batch) -> int:
        return len(batch["label"])

    def loss_from(self, outputs, batch) -> torch.Tensor:
        return F.cross_entropy(outputs, batch["label"], reduction="sum")

    def metric_names(self) -> list[str]:
        return ["loss", "accuracy", "balanced_accuracy"]

    def result_metrics(self) -> tuple[str, ...]:
        return ("balanced_accuracy", "accuracy")

    def new_metrics(self) -> BalancedMetrics:
        return BalancedMetrics()

    def update_metrics(self, metrics, outputs, batch, rows, examples) -> None:
        metrics.update(outputs.argmax(-1).cpu(), batch["label"].cpu())

    def predictions(self, outputs, batch, rows, examples) -> list[dict]:
        names = self.labels.labels
        return [{"text": e.text, "label": names[int(p.argmax())],
                 "probs": {n: round(float(q), 6) for n, q in zip(names, p.softmax(-1))}}
                for e, p in zip(examples, outputs.cpu())]
