"""Batches for causal language modelling: random windows for training, fixed windows for evaluation."""

from __future__ import annotations

import numpy as np
import torch

from lmforge.losses import IGNORE_INDEX


def _windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    idx = starts[:, None] + np.arange(length)[None, :]
    return torch.from_numpy(tokens[idx].astype(np.int64))


class RandomWindows:
    """Endless batches of `batch_size` windows of `seq_len` + 1 tokens at random offsets.

    The sampler's generator state is its whole position, so a checkpoint of it resumes exactly. With
    `shard` = (rank, world), every rank draws the same global batch of world x batch_size windows and
    keeps its own slice: ranks see disjoint parts of exactly what one process with a world times larger
    batch would see, and the position is the same on every rank, so it resumes at any world size.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, shard: tuple[int, int] = (0, 1)):
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.rank, self.world = shard
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        high = len(self.tokens) - self.seq_len  # a start must leave seq_len + 1 tokens
        starts = torch.randint(high, (self.batch_size * self.world,), generator=self.generator).numpy()
        starts = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        w = _windows(self.tokens, starts, self.seq_len + 1)
        return {"input": w[:, :-1], "target": w[:, 1:]}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def eval_windows(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int = 0):
    """Batches that score every target token of `tokens` (all but the first) exactly once.

    Windows are laid end to end; the last one is aligned to the end of the split and its targets that
    an earlier window already scored are set to IGNORE_INDEX. With max_batches > 0, that many batches
    of windows spread evenly over the split are used instead.
    """
    n = len(tokens)
    starts = np.arange(0, n - seq_len, seq_len)
    covered = starts[-1] + seq_len  # targets 1..covered are scored by the windows in `starts`
    tail = n - 1 - covered
    if tail > 0:
        starts = np.append(starts, n - 1 - seq_len)
    if max_batches and len(starts) > max_batches * batch_size:
        pick = np.linspace(0, len(starts) - 1, max_batches * batch_size).round().astype(int)
        starts, tail = starts[pick], tail if pick[-1] == len(starts) - 1 else 0
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        w = _windows(tokens, chunk, seq_len + 1)
        target = w[:, 1:].clone()
        if tail > 0 and i + batch_size >= len(starts):
            target[-1, :seq_len - tail] = IGNORE_INDEX
        yield {"input": w[:, :-1], "target": target}
