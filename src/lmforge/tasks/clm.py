"""Causal language modelling: predict each next token of raw text."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lmforge.data.batches import RandomWindows, eval_windows
from lmforge.data.store import prepare_tokens
from lmforge.data.tokenizer import eos_id
from lmforge.errors import UserError
from lmforge.generate import generate_text
from lmforge.losses import linear_cross_entropy, loss_options
from lmforge.model.transformer import GPT
from lmforge.tasks import Task


class CausalLM(Task):
    name = "clm"

    def setup(self) -> None:
        self.data = prepare_tokens(self.cfg.data, self.cfg.model.max_seq_len)
        vocab = self.data.tokenizer.get_vocab_size()
        if self.cfg.model.vocab_size == 0:
            self.cfg.model = dataclasses.replace(self.cfg.model, vocab_size=vocab)
        elif self.cfg.model.vocab_size < vocab:
            raise UserError(f"config: model.vocab_size = {self.cfg.model.vocab_size} is smaller than the "
                            f"tokenizer's vocabulary of {vocab}; set it to 0 to follow the tokenizer")

    def build_model(self, pretrained: bool = False) -> GPT:
        return GPT(self.cfg.model)

    def train_batches(self, seed: int) -> RandomWindows:
        return RandomWindows(self.data.train, self.cfg.model.max_seq_len, self.cfg.train.batch_size, seed, self.shard)

    def eval_batches(self):
        ec = self.cfg.eval
        return eval_windows(self.data.val, self.cfg.model.max_seq_len, ec.batch_size, ec.batches)

    def loss(self, model, batch) -> torch.Tensor:
        hidden = model.features(batch["input"])
        return linear_cross_entropy(hidden, model.head.weight, batch["target"], model.head.bias, reduction="sum",
                                    chunked=self.cfg.loss.chunked, **loss_options(self.cfg.loss, hidden.device))

    def save_artifacts(self, run_dir: Path) -> None:
        self.data.tokenizer.save(str(run_dir / "tokenizer.json"))

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
