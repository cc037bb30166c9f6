"""T5-style span corruption (Raffel et al., 2020): pre-train an encoder-decoder on monolingual text.

Each example is a window of model.max_seq_len tokens of the corpus. About noise_density of its tokens,
in spans of mean_span_length, are cut out: the encoder sees the rest with each span replaced by a
sentinel <extra_id_i>, and the decoder learns to write the spans, each after its sentinel, then </s>.
The model and its tokenizer can then start a translation run (seq2seq.init_from).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from lmforge.data.batches import RandomWindows, eval_windows
from lmforge.data.store import prepare_tokens
from lmforge.data.tokenizer import SEQ2SEQ_SPECIALS, save_tokenizer, sentinel, seq2seq_special_ids
from lmforge.errors import UserError
from lmforge.tasks.base import Task, at_least_vocab, corpus_summary
from lmforge.tasks.seq2seq import collate, seq2seq_loss


def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(corrupted tokens, spans) of a window of `length` tokens: at least one of each, and at least one
    token left uncorrupted."""
    noise = min(max(1, round(length * noise_density)), length - 1)
    return noise, max(1, min(round(noise / mean_span_length), length - noise))


def _split(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`total` cut into `parts` positive lengths at random."""
    cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False)) if parts > 1 else np.array([], int)
    return np.diff(np.concatenate([[0], cuts, [total]]))


def _whole_windows(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model.max_seq_len-token windows behind a causal-LM batch (input plus its last target)."""
    return torch.cat([batch["input"], batch["target"][:, -1:]], dim=1)


def corrupt(tokens: np.ndarray, noise_density: float, mean_span_length: float, sentinels: list[int], eos: int,
            rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """One window -> (encoder input, decoder target): kept runs and corrupted spans alternate, starting
    with a kept run, so every span has text before it."""
    noise, spans = span_counts(len(tokens), noise_density, mean_span_length)
    kept, cut = _split(len(tokens) - noise, spans, rng), _split(noise, spans, rng)
    source, target, pos = [], [], 0
    for i, (k, c) in enumerate(zip(kept, cut)):
        source += tokens[pos:pos + k].tolist() + [sentinels[i]]
        target += [sentinels[i]] + tokens[pos + k:pos + k + c].tolist()
        pos += k + c
    return source + [eos], target + [eos]


class SpanCorruption(Task):
    name = "span"

    def setup(self) -> None:
        mc, sc = self.cfg.model, self.cfg.span
        noise, spans = span_counts(mc.max_seq_len, sc.noise_density, sc.mean_span_length)
        if spans + 1 > noise:  # the encoder input (kept tokens, a sentinel per span, </s>) must fit the context
            raise UserError(f"config: model.max_seq_len = {mc.max_seq_len} is too short for span corruption with "
                            f"span.noise_density = {sc.noise_density:g}; expected a longer window")
        tc = self.cfg.data.tokenizer
        # the tokenizer trained here needs the encoder-decoder's tokens and the sentinels
        self.special_tokens = None if tc.path else SEQ2SEQ_SPECIALS + [sentinel(i) for i in range(spans)]
        self.data = prepare_tokens(self._data_config(), mc.max_seq_len)
        tok = self.data.tokenizer
        self.pad, self.bos, self.eos = seq2seq_special_ids(tok)
        self.sentinels = [tok.token_to_id(sentinel(i)) for i in range(spans)]
        if None in self.sentinels:
            raise UserError(f"tokenizer: {tc.path}: has no {sentinel(self.sentinels.index(None))} token; span "
                            f"corruption of {mc.max_seq_len}-token windows needs <extra_id_0> .. "
                            f"<extra_id_{spans - 1}>")
        self.resolve()

    def _data_config(self):
        """The data section with the special tokens a tokenizer trained here needs."""
        dc = self.cfg.data
        if self.special_tokens is None:
            return dc
        return dataclasses.replace(dc, tokenizer=dataclasses.replace(dc.tokenizer, special_tokens=self.special_tokens))

    def resolve(self):
        """The special tokens of the tokenizer trained here (config.yaml records them), and
        model.vocab_size at least the tokenizer's."""
        if self.special_tokens is not None:
            self.cfg.data.tokenizer.special_tokens = self.special_tokens
        self.cfg.model = at_least_vocab(self.cfg.model, self.data.tokenizer.get_vocab_size())
        return self.cfg

    def _examples(self, windows: torch.Tensor, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        sc = self.cfg.span
        pairs = [corrupt(w, sc.noise_density, sc.mean_span_length, self.sentinels, self.eos, rng)
                 for w in windows.numpy()]
        return collate([s for s, _ in pairs], [t for _, t in pairs], self.pad, self.bos)

    def train_batches(self, seed: int) -> "SpanBatches":
        windows = RandomWindows(self.data.train, self.cfg.model.max_seq_len - 1, self.cfg.train.batch_size, seed,
                                self.shard)
        return SpanBatches(windows, self._examples, seed)

    def eval_batches(self):
        ec = self.cfg.eval
        for i, b in enumerate(eval_windows(self.data.val, self.cfg.model.max_seq_len - 1, ec.batch_size, ec.batches)):
            # the same corruption of the same windows at every evaluation, so val losses compare
            yield self._examples(_whole_windows(b), np.random.default_rng([0, i]))

    def loss(self, model, batch) -> torch.Tensor:
        return seq2seq_loss(model, batch, self.cfg.loss)

    def flops_per_token(self, model) -> float:
        n = self.cfg.model.max_seq_len
        return model.encoder.flops_per_token(n) + model.decoder.flops_per_token(math.ceil(n * self.cfg.span.noise_density))

    def summary(self) -> str:
        return corpus_summary(self.data, self.cfg)

    def save_artifacts(self, run_dir) -> None:
        save_tokenizer(self.data.tokenizer, run_dir / "tokenizer.json")


class SpanBatches:
    """Random windows of model.max_seq_len tokens, corrupted; resumable (the windows' generator, and a
    corruption generator seeded by the batch number)."""

    def __init__(self, windows: RandomWindows, make, seed: int):
        self.windows, self.make, self.seed, self.index = windows, make, seed, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        b = next(self.windows)
        rng = np.random.default_rng([self.seed, self.windows.rank, self.index])
        self.index += 1
        return self.make(_whole_windows(b), rng)

    def state_dict(self) -> dict:
        return {"windows": self.windows.state_dict(), "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.windows.load_state_dict(state["windows"])
        self.index = state["index"]
