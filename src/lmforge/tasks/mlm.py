"""Masked language modelling (BERT): predict masked tokens from both sides, optionally with
next-sentence prediction. The examples and the masking are in data/masking.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.data.masking import Masker, MLMBatches, MLMExamples, mlm_eval_batches, special_ids
from lmforge.data.store import prepare_tokens
from lmforge.data.tokenizer import save_tokenizer
from lmforge.errors import UserError
from lmforge.losses import IGNORE_INDEX, linear_cross_entropy, loss_options
from lmforge.tasks.base import Task, corpus_summary, follow_tokenizer

EVAL_MASK_SEED = 1234  # the val set is masked the same way at every evaluation


class MaskedLMTask(Task):
    name = "mlm"

    def setup(self) -> None:
        cfg = self.cfg
        self.data = prepare_tokens(cfg.data, cfg.model.max_seq_len)
        self.resolve()
        tok = self.data.tokenizer
        vocab = tok.get_vocab_size()
        if cfg.mlm.nsp and cfg.model.type_vocab_size < 2:
            raise UserError(f"config: mlm.nsp = true needs model.type_vocab_size >= 2 (got "
                            f"{cfg.model.type_vocab_size}) for the segments of sentences A and B")
        where = f"data.tokenizer ({cfg.data.tokenizer.path or cfg.data.tokenizer.kind})"
        ids = special_ids(tok, where)
        self.masker = Masker(tok, cfg.mlm, ids, where)
        seq = cfg.model.max_seq_len
        self.train_examples = MLMExamples(self.data.train, seq, ids, self.masker, cfg.mlm.nsp)
        self.val_examples = MLMExamples(self.data.val, seq, ids, self.masker, cfg.mlm.nsp)
        # The unigram baseline: always predict the most frequent ordinary token of the training split.
        counts = np.bincount(self.data.train, minlength=vocab)[:vocab]
        counts[self.masker.special.numpy()[:vocab]] = 0
        self.most_frequent = int(counts.argmax())

    def resolve(self):
        """model.vocab_size: the tokenizer's where it is 0."""
        self.cfg.model = follow_tokenizer(self.cfg.model, self.data.tokenizer.get_vocab_size())
        return self.cfg

    def train_batches(self, seed: int) -> MLMBatches:
        return MLMBatches(self.train_examples, self.cfg.train.batch_size, seed, self.shard)

    def eval_batches(self):
        ec = self.cfg.eval
        return mlm_eval_batches(self.val_examples, ec.batch_size, ec.batches, EVAL_MASK_SEED)

    def _forward(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(hidden states of the masked positions after the MLM transform [M, d], their targets [M],
        NSP logits [B, 2] or None). Only masked positions go through the head and the loss."""
        hidden = model.features(batch["input"], segments=batch["segments"])
        chosen = batch["target"] != IGNORE_INDEX
        masked = model.mlm_head.transform(hidden[chosen])
        nsp_logits = model.nsp_head(model.pooled(hidden)) if self.cfg.mlm.nsp else None
        return masked, batch["target"][chosen], nsp_logits

    def loss(self, model, batch) -> torch.Tensor:
        """The MLM loss summed over masked tokens, plus (with NSP) the NSP loss summed over sequences
        times the expected masked tokens per sequence. Divided by the masked count, as the loop does,
        that is mean MLM + mean NSP (BERT's objective) up to the draw's deviation from the expected
        count, and, unlike weighting by each micro-batch's own count, it does not depend on how a step
        is split into micro-batches and ranks."""
        masked, targets, nsp_logits = self._forward(model, batch)
        out = model.mlm_head.out
        loss = linear_cross_entropy(masked, out.weight, targets, out.bias, reduction="sum",
                                    chunked=self.cfg.loss.chunked, **loss_options(self.cfg.loss, masked.device))
        if nsp_logits is not None:
            per_sequence = self.cfg.mlm.mask_prob * self.train_examples.span
            loss = loss + F.cross_entropy(nsp_logits.float(), batch["nsp_label"], reduction="sum") * per_sequence
        return loss

    @torch.no_grad()
    def evaluate(self, model, to_device) -> dict[str, float]:
        mlm_sum, nsp_sum, n, correct, baseline, nsp_correct, n_seq = 0.0, 0.0, 0, 0, 0, 0, 0
        out = model.mlm_head.out
        for batch in self.eval_batches():
            batch = to_device(batch)
            masked, targets, nsp_logits = self._forward(model, batch)
            logits = F.linear(masked, out.weight, out.bias).float()
            mlm_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
            baseline += int((targets == self.most_frequent).sum())
            n += len(targets)
            if nsp_logits is not None:
                labels = batch["nsp_label"]
                nsp_sum += float(F.cross_entropy(nsp_logits.float(), labels, reduction="sum"))
                nsp_correct += int((nsp_logits.argmax(-1) == labels).sum())
                n_seq += len(labels)
        mlm_loss = mlm_sum / max(n, 1)
        metrics = {"loss": mlm_loss, "ppl": math.exp(min(mlm_loss, 50.0)), "acc": correct / max(n, 1),
                   "unigram_acc": baseline / max(n, 1), "tokens": n}
        if n_seq:
            metrics["nsp_loss"] = nsp_sum / n_seq
            metrics["nsp_acc"] = nsp_correct / n_seq
            metrics["loss"] = mlm_loss + metrics["nsp_loss"]
            metrics["mlm_loss"] = mlm_loss
        return metrics

    def flops_per_token(self, model) -> float:
        # Only the masked positions go through the MLM head (6 FLOPs per weight per token each).
        head = sum(m.weight.numel() for m in (model.mlm_head.dense, model.mlm_head.out))
        return model.flops_per_token() - 6 * head * (1 - self.cfg.mlm.mask_prob)

    def summary(self) -> str:
        # an example holds `span` tokens of the corpus: its window less [CLS] and the [SEP]s
        return corpus_summary(self.data, self.cfg, self.train_examples.span)

    def save_artifacts(self, run_dir: Path) -> None:
        save_tokenizer(self.data.tokenizer, run_dir / "tokenizer.json")

    def finish(self, model, run_dir: Path) -> str:
        m = self.evaluate(model, lambda b: {k: v.to(next(model.parameters()).device) for k, v in b.items()})
        text = (f"masked-token accuracy {m['acc']:.4f} on {m['tokens']} val targets; unigram baseline "
                f"(always '{self.data.tokenizer.id_to_token(self.most_frequent)}') {m['unigram_acc']:.4f}")
        if "nsp_acc" in m:
            text += f"; next-sentence accuracy {m['nsp_acc']:.4f}"
        return text
