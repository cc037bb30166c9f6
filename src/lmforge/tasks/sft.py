"""Supervised fine-tuning of a causal LM on prompt/response pairs: the model reads prompt + response
and is trained to predict the response (and the end-of-text token after it) only; prompt tokens carry
no loss. The logits are never formed for the whole batch: the loss fuses the output layer with the
cross-entropy in chunks, and the token accuracy reads the predictions at the response tokens only."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.data.batches import pack_batch, pad_batch
from lmforge.data.labelled import Example
from lmforge.generate import generate_text
from lmforge.losses import IGNORE_INDEX, rows_per_chunk
from lmforge.tasks.clm import next_token_loss
from lmforge.tasks.finetune import Encoded, FinetuneTask


class _TokenMetrics:
    """Next-token accuracy over response tokens (the loss is summed by the caller)."""

    def __init__(self):
        self.correct = self.n = 0

    def update(self, pred: torch.Tensor, gold: torch.Tensor) -> None:
        self.correct += int((pred == gold).sum())
        self.n += len(gold)

    def result(self) -> dict:
        return {"token_accuracy": self.correct / max(self.n, 1), "tokens": self.n}


def next_tokens(hidden: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    """The most likely token after each of the rows of hidden states [M, d]: argmax of head(hidden), a
    chunk of rows at a time, so the [M, V] logits are never held at once."""
    rows = rows_per_chunk(hidden.device, head.out_features)
    return torch.cat([head(h).argmax(-1) for h in hidden.split(rows)])


class SFTTask(FinetuneTask):
    name = "sft"
    default_metric = "loss"
    needs_decoder = True

    def label_map(self, train, dev):
        return None

    def encode_all(self, examples: list[Example], path: str) -> list[Encoded]:
        tok = self.tokenizer
        prompts = tok.encode_batch([e.text for e in examples], add_special_tokens=False)
        responses = tok.encode_batch([e.label or "" for e in examples], add_special_tokens=False)
        end = [self.eos_id] if self.eos_id is not None else []
        rows = []
        for e, p, r in zip(examples, prompts, responses):
            p, r = p.ids, r.ids + end
            p = p[-(self.max_length // 2):] if len(p) + len(r) > self.max_length + 1 else p  # keep room for the answer
            ids = (p + r)[:self.max_length + 1]
            target = [IGNORE_INDEX] * (len(p) - 1) + ids[len(p):]
            rows.append(Encoded(ids[:-1], None, target[:len(ids) - 1]))
        return rows

    def targets(self, rows, examples) -> dict[str, torch.Tensor]:
        return {"target": pad_batch([r.target for r in rows], IGNORE_INDEX)}

    def collate(self, rows, examples) -> dict[str, torch.Tensor]:
        """finetune.pack: the batch's examples packed into rows of up to max_length tokens (each attends to
        itself only), the same examples and targets as the padded batch, so the same loss."""
        if not self.cfg.finetune.pack:
            return super().collate(rows, examples)
        return pack_batch([r.ids for r in rows], [r.target for r in rows], self.max_length, self.pad_id)

    def outputs(self, model, batch) -> tuple[torch.Tensor, nn.Linear]:
        """(the last hidden states [B, T, d], the output layer): the logits are left to the loss's chunks."""
        return model.features(batch["input"], doc_ids=batch.get("doc_ids")), model.head

    def loss_from(self, outputs, batch) -> torch.Tensor:
        hidden, head = outputs
        return next_token_loss(hidden, head, batch["target"], self.cfg.loss)

    def metric_names(self):
        return ["loss", "ppl", "token_accuracy"]

    def result_metrics(self):
        return ("loss", "ppl", "token_accuracy")

    def new_metrics(self):
        return _TokenMetrics()

    def update_metrics(self, metrics, outputs, batch, rows, examples) -> None:
        hidden, head = outputs
        scored = batch["target"] != IGNORE_INDEX
        metrics.update(next_tokens(hidden[scored], head), batch["target"][scored])

    def measure(self, model, device, rows, examples):
        # ppl is the mean loss's, which the metrics object does not see
        scalars, metrics = super().measure(model, device, rows, examples)
        scalars["ppl"] = math.exp(min(scalars["loss"], 50.0))
        return scalars, metrics

    def predict(self, model, examples, path) -> list[dict]:
        """Each prompt's greedy response: generated one example at a time, so there is no batch forward
        pass to share (and predictions() is not used)."""
        with torch.no_grad():
            return [{"prompt": e.text, "response": self.respond(model, e.text)} for e in examples]

    def respond(self, model, prompt_text: str) -> str:
        """The greedy response (at most max_length tokens) to the prompt's last max_length / 2 tokens."""
        prompt = self.tokenizer.encode(prompt_text, add_special_tokens=False).ids[-(self.max_length // 2):]
        room = self.cfg.model.max_seq_len - len(prompt)
        return generate_text(model, self.tokenizer, prompt, max_new_tokens=min(room, self.max_length), temperature=0.0)
