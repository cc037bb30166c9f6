"""Supervised fine-tuning of a causal LM on prompt/response pairs: the model reads prompt + response
and is trained to predict the response (and the end-of-text token after it) only; prompt tokens carry
no loss."""

from __future__ import annotations

import math

import torch

from lmforge.data.batches import pad_batch
from lmforge.data.labelled import Example
from lmforge.errors import UserError
from lmforge.generate import generate_text
from lmforge.losses import IGNORE_INDEX, linear_cross_entropy, loss_options
from lmforge.model.transformer import GPT
from lmforge.tasks.finetune import Encoded, FinetuneTask


class _TokenMetrics:
    """Next-token accuracy over response tokens (the loss is summed by the caller)."""

    def __init__(self):
        self.correct = self.n = 0

    def result(self) -> dict:
        return {"token_accuracy": self.correct / max(self.n, 1), "tokens": self.n}


class SFTTask(FinetuneTask):
    name = "sft"
    default_metric = "loss"

    def _label_map(self, train, dev):
        return None

    def _adopt(self, base_cfg):
        model = super()._adopt(base_cfg)
        if self.cfg.finetune.body != "decoder":
            raise UserError(f"config: task sft needs a causal language model; finetune.init_from = "
                            f"{self.cfg.finetune.init_from} holds a {base_cfg.task} encoder")
        return model

    def head_model(self) -> GPT:
        return GPT(self.cfg.model)

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

    def loss(self, model, batch) -> torch.Tensor:
        hidden = model.features(batch["input"])
        return linear_cross_entropy(hidden, model.head.weight, batch["target"], model.head.bias, reduction="sum",
                                    chunked=self.cfg.loss.chunked, **loss_options(self.cfg.loss, hidden.device))

    def metric_names(self):
        return ["loss", "ppl", "token_accuracy"]

    def result_metrics(self):
        return ("loss", "ppl", "token_accuracy")

    def new_metrics(self):
        return _TokenMetrics()

    def update_metrics(self, metrics, model, batch, rows, examples) -> None:
        target = batch["target"]
        scored = target != IGNORE_INDEX
        pred = model(batch["input"]).argmax(-1)
        metrics.correct += int((pred[scored] == target[scored]).sum())
        metrics.n += int(scored.sum())

    def measure(self, model, device, rows, examples):
        scalars, metrics = super().measure(model, device, rows, examples)
        scalars["ppl"] = math.exp(min(scalars["loss"], 50.0))
        return scalars, metrics

    def predictions(self, model, batch, rows, examples) -> list[dict]:
        out = []
        for e, r in zip(examples, rows):
            prompt = self.tokenizer.encode(e.text, add_special_tokens=False).ids[-(self.max_length // 2):]
            room = self.cfg.model.max_seq_len - len(prompt)
            text = generate_text(model, self.tokenizer, prompt, max_new_tokens=min(room, self.max_length),
                                 temperature=0.0)
            out.append({"prompt": e.text, "response": text})
        return out
