"""Causal language modelling: predict each next token of raw text. `next_token_loss` is the loss of
every task whose model predicts tokens through an output layer (clm, sft, seq2seq, span)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmforge.data.batches import RandomWindows, eval_windows
from lmforge.data.store import prepare_tokens
from lmforge.data.tokenizer import eos_id, save_tokenizer
from lmforge.errors import UserError
from lmforge.generate import generate_text
from lmforge.losses import linear_cross_entropy, loss_options
from lmforge.tasks.base import Task, corpus_summary, follow_tokenizer


def next_token_loss(hidden: torch.Tensor, head: nn.Linear, target: torch.Tensor, loss_cfg) -> torch.Tensor:
    """The summed cross-entropy of the targets over the logits head(hidden), the output layer fused
    with the loss in chunks where the logits would be large (losses.linear_cross_entropy), with the
    options of the config's loss section."""
    return linear_cross_entropy(hidden, head.weight, target, head.bias, reduction="sum", chunked=loss_cfg.chunked,
                                **loss_options(loss_cfg, hidden.device))


class CausalLM(Task):
    name = "clm"

    def setup(self) -> None:
        self.data = prepare_tokens(self.cfg.data, self.cfg.model.max_seq_len)
        self.pack_eos = None  # data.pack: the end-of-text id that separates the packed documents
        if self.cfg.data.pack:
            self.pack_eos = eos_id(self.data.tokenizer)
            if self.pack_eos is None:
                raise UserError("config: data.pack = true needs an end-of-text token between documents, and the "
                                "tokenizer has none (train one with the default data.tokenizer.special_tokens)")
        self.resolve()

    def resolve(self):
        """model.vocab_size: the tokenizer's where it is 0."""
        self.cfg.model = follow_tokenizer(self.cfg.model, self.data.tokenizer.get_vocab_size())
        return self.cfg

    def train_batches(self, seed: int) -> RandomWindows:
        return RandomWindows(self.data.train, self.cfg.model.max_seq_len, self.cfg.train.batch_size, seed, self.shard,
                             eos=self.pack_eos)

    def eval_batches(self):
        ec = self.cfg.eval
        # packed training is evaluated packed: the val loss measures what the model is trained to do
        return eval_windows(self.data.val, self.cfg.model.max_seq_len, ec.batch_size, ec.batches, eos=self.pack_eos)

    def loss(self, model, batch) -> torch.Tensor:
        hidden = model.features(batch["input"], doc_ids=batch.get("doc_ids"))
        return next_token_loss(hidden, model.head, batch["target"], self.cfg.loss)

    def summary(self) -> str:
        return corpus_summary(self.data, self.cfg)

    def save_artifacts(self, run_dir: Path) -> None:
        save_tokenizer(self.data.tokenizer, run_dir / "tokenizer.json")

    def finish(self, model, run_dir: Path) -> str:
        lc = self.cfg.log
        tok = self.data.tokenizer
        eos = eos_id(tok)
        prompt = [eos] if eos is not None else tok.encode("\n", add_special_tokens=False).ids
        samples = []
        for i in range(lc.samples):
            gen = torch.Generator(device=next(model.parameters()).device).manual_seed(self.cfg.train.seed + i)
            samples.append(generate_text(model, tok, prompt, max_new_tokens=lc.sample_tokens, temperature=0.8,
                                         top_k=50, generator=gen, stop_at_eos=False))
        return "\n".join(f"--- sample {i + 1} ---\n{s.strip()}" for i, s in enumerate(samples))
