"""Batches: random windows of a token stream (causal LM), and epochs over labelled examples of varying
length (fine-tuning) with dynamic padding."""

from __future__ import annotations

import numpy as np
import torch

from lmforge.losses import IGNORE_INDEX


def _windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    idx = starts[:, None] + np.arange(length)[None, :]
    return torch.from_numpy(tokens[idx].astype(np.int64))


def window_batch(w: torch.Tensor, eos: int | None = None) -> dict[str, torch.Tensor]:
    """Windows of seq_len + 1 tokens -> input and target; with eos (packed pre-training) also doc_ids,
    a new document at each end-of-text token: the eos that ends one document is the first input of the
    next, as a generation prompt [eos] is, so every target is still scored once and none is predicted
    from another document's tokens (a document's last token predicts the eos from its own context)."""
    batch = {"input": w[:, :-1], "target": w[:, 1:]}
    if eos is not None:
        batch["doc_ids"] = (batch["input"] == eos).cumsum(dim=1)
    return batch


def packed_starts(tokens: np.ndarray, eos: int, seq_len: int) -> np.ndarray:
    """Window starts for packed pre-training: each document's start (the eos before it; the stream's
    start) and, inside a document longer than a window, every seq_len tokens, so that no part of it
    goes unseen; only starts that leave seq_len + 1 tokens."""
    n = len(tokens)
    docs = np.union1d([0], np.flatnonzero(tokens == eos))
    pieces = -(-np.diff(np.append(docs, n)) // seq_len)  # windows per document, rounded up
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    starts = np.repeat(docs, pieces) + (np.arange(pieces.sum()) - first) * seq_len
    return starts[starts <= n - seq_len - 1]


class RandomWindows:
    """Endless batches of `batch_size` windows of `seq_len` + 1 tokens at random offsets.

    The sampler's generator state is its whole position, so a checkpoint of it resumes exactly. With
    `shard` = (rank, world), every rank draws the same global batch of world x batch_size windows and
    keeps its own slice: ranks see disjoint parts of exactly what one process with a world times larger
    batch would see, and the position is the same on every rank, so it resumes at any world size.

    Packed (eos given): windows start only at `packed_starts` and carry doc_ids (window_batch).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, shard: tuple[int, int] = (0, 1),
                 eos: int | None = None):
        self.tokens, self.seq_len, self.batch_size, self.eos = tokens, seq_len, batch_size, eos
        self.rank, self.world = shard
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.starts = packed_starts(tokens, eos, seq_len) if eos is not None else None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        # a start must leave seq_len + 1 tokens; packed, the draw is an index into the allowed starts
        high = len(self.tokens) - self.seq_len if self.starts is None else len(self.starts)
        starts = torch.randint(high, (self.batch_size * self.world,), generator=self.generator, device="cpu").numpy()
        starts = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        if self.starts is not None:
            starts = self.starts[starts]
        return window_batch(_windows(self.tokens, starts, self.seq_len + 1), self.eos)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def eval_windows(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int = 0, eos: int | None = None):
    """Batches that score every target token of `tokens` (all but the first) exactly once; with eos,
    packed (window_batch), so a window's first document may be the tail of one it cut.

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
        batch = window_batch(_windows(tokens, chunk, seq_len + 1), eos)
        batch["target"] = batch["target"].clone()
        if tail > 0 and i + batch_size >= len(starts):
            batch["target"][-1, :seq_len - tail] = IGNORE_INDEX
        yield batch


class ExampleBatches:
    """Endless batches of example indices, epoch after epoch, each epoch a new seeded order.

    With group_by_length, each run of 50 global batches of the shuffled order is sorted by length before
    it is cut into batches, and the batches are shuffled again: similar lengths share a batch (little
    padding) while the order stays random. The position is (epoch, batch), so a checkpoint resumes
    exactly; with `shard` = (rank, world) each rank keeps its slice of every global batch of world x
    batch_size examples. `make(indices, epoch, batch)` turns indices into a batch of tensors.

    With max_tokens (translation), batches hold a number of tokens instead of examples: the epoch's
    examples are sorted by length (length buckets) and cut into batches of at most max_tokens x world
    padded tokens (examples x the longest), which are then shuffled: short sentences come in large
    batches, long ones in small, and no batch wastes much on padding.
    """

    GROUP = 50  # global batches sorted together

    def __init__(self, lengths: list[int], batch_size: int, seed: int, make, shard: tuple[int, int] = (0, 1),
                 group_by_length: bool = True, max_tokens: int = 0):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.make, self.group = batch_size, seed, make, group_by_length
        self.max_tokens = max_tokens
        self.rank, self.world = shard
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        size = self.batch_size * self.world
        if self.max_tokens:
            order = order[np.argsort(self.lengths[order], kind="stable")]
            batches = [b for b in self._by_tokens(order) if len(b) >= self.world]
            return [batches[i] for i in rng.permutation(len(batches))]
        if self.group:
            chunks = [order[i:i + size * self.GROUP] for i in range(0, len(order), size * self.GROUP)]
            order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks])
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        batches = [b for b in batches if len(b) >= self.world]  # every rank gets at least one example
        if self.group:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _by_tokens(self, order: np.ndarray) -> list[np.ndarray]:
        budget = self.max_tokens * self.world
        batches, start, longest = [], 0, 0
        for i, length in enumerate(self.lengths[order]):
            if i > start and max(longest, length) * (i - start + 1) > budget:
                batches.append(order[start:i])
                start, longest = i, 0
            longest = max(longest, length)
        batches.append(order[start:])
        return batches

    def steps_per_epoch(self) -> int:
        return len(self._order)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        chosen = self._order[self.index]
        per_rank = -(-len(chosen) // self.world)
        mine = chosen[self.rank * per_rank:(self.rank + 1) * per_rank]
        batch = self.make(mine, self.epoch, self.index)
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._epoch_order(self.epoch)


def pad_batch(rows: list[list[int]], pad_id: int, fill: int | None = None) -> torch.Tensor:
    """Right-pad lists of ids to the longest one: [B, T] (fill: the padding value, default pad_id)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id if fill is None else fill, dtype=torch.long, device="cpu")
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long, device="cpu")
    return out


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of examples grouped into rows of at most `capacity` tokens: longest first, each into the
    first row with room (first-fit decreasing), so few rows and little padding are left."""
    rows, room = [], []
    for i in np.argsort([-n for n in lengths], kind="stable"):
        n = lengths[i]
        j = next((k for k, r in enumerate(room) if r >= n), len(rows))
        if j == len(rows):
            rows.append([])
            room.append(capacity)
        rows[j].append(int(i))
        room[j] -= n
    return rows


def pack_batch(ids: list[list[int]], targets: list[list[int]], capacity: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Examples (token ids, per-token targets already shifted within each example, so none crosses into
    the next) packed into rows of at most `capacity` tokens: input, target (IGNORE_INDEX on padding),
    doc_ids (the example's place in its row; -1 on padding) and pad_mask."""
    rows = pack_rows([len(r) for r in ids], capacity)
    joined = lambda lists: [[t for i in row for t in lists[i]] for row in rows]  # noqa: E731
    doc_ids = pad_batch([[k for k, i in enumerate(row) for _ in ids[i]] for row in rows], -1)
    return {"input": pad_batch(joined(ids), pad_id), "target": pad_batch(joined(targets), IGNORE_INDEX),
            "doc_ids": doc_ids, "pad_mask": doc_ids >= 0}
