"""Masked-LM examples (BERT, Devlin et al. 2019): [CLS] A [SEP] (B [SEP]) cut from the token stream,
with dynamic masking drawn afresh for every batch.

Masking: each non-special token (or, with whole_word, each word: all its pieces together) is chosen
with probability mask_prob; a chosen token becomes [MASK] with probability mask_token_prob, a random
token with random_token_prob, and stays as it is otherwise. Only chosen tokens are targets.

Next-sentence prediction: A and B are contiguous spans of the stream (BERT's "sentences" are spans
of text, not linguistic sentences) that together fill the context; in half the examples B is the text
that follows A (label 0, as in Hugging Face's BertForPreTraining), in the other half a span from a
random place in the split (label 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer

from lmforge.errors import UserError
from lmforge.losses import IGNORE_INDEX

# Accepted spellings of the tokens a masked LM needs: BERT's, then RoBERTa's.
SPECIAL_NAMES = {"cls": ("[CLS]", "<s>"), "sep": ("[SEP]", "</s>"), "mask": ("[MASK]", "<mask>")}


@dataclass
class SpecialIds:
    cls: int
    sep: int
    mask: int


def special_ids(tok: Tokenizer, where: str) -> SpecialIds:
    found = {}
    for role, names in SPECIAL_NAMES.items():
        ids = [i for i in (tok.token_to_id(n) for n in names) if i is not None]
        if not ids:
            raise UserError(f"{where}: the mlm task needs a {names[0]} token and the tokenizer has none; use "
                            f"data.tokenizer.kind = wordpiece or add {names[0]} to data.tokenizer.special_tokens")
        found[role] = ids[0]
    return SpecialIds(**found)


def word_starts(tok: Tokenizer, where: str) -> torch.Tensor:
    """bool [V]: which tokens begin a word (WordPiece: no '##' prefix; byte-level BPE: a leading space 'Ġ')."""
    kind = type(tok.model).__name__
    vocab = tok.get_vocab()
    starts = torch.zeros(tok.get_vocab_size(), dtype=torch.bool, device="cpu")
    if kind == "WordPiece":
        prefix = tok.model.continuing_subword_prefix
        for token, i in vocab.items():
            starts[i] = not token.startswith(prefix)
    elif kind == "BPE":
        for token, i in vocab.items():
            starts[i] = token.startswith("Ġ")
    else:
        raise UserError(f"{where}: mlm.whole_word needs a wordpiece or bpe tokenizer to find word boundaries "
                        f"(this one is {kind})")
    return starts


class Masker:
    """BERT's dynamic masking of a batch of token ids."""

    def __init__(self, tok: Tokenizer, mc, ids: SpecialIds, where: str):
        vocab_size = tok.get_vocab_size()
        self.special = torch.zeros(vocab_size, dtype=torch.bool, device="cpu")
        for i in tok.get_added_tokens_decoder():
            if i < vocab_size:
                self.special[i] = True
        self.special[[ids.cls, ids.sep, ids.mask]] = True
        self.random_pool = (~self.special).nonzero().squeeze(1)  # a random replacement is an ordinary token
        self.starts = word_starts(tok, where) | self.special if mc.whole_word else None
        self.mc, self.mask_id = mc, ids.mask

    def __call__(self, ids: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, T] -> (input with replacements, target: the original id at chosen positions, IGNORE_INDEX elsewhere)."""
        mc = self.mc
        u = torch.rand(ids.shape, generator=g, device="cpu")
        if self.starts is not None:  # every piece takes the draw of the piece that starts its word
            start = self.starts[ids]
            start[:, 0] = True
            word = start.cumsum(1) - 1
            u = torch.zeros_like(u).scatter_add_(1, word, torch.where(start, u, 0.0)).gather(1, word)
        chosen = (u < mc.mask_prob) & ~self.special[ids]
        target = torch.where(chosen, ids, IGNORE_INDEX)
        r = torch.rand(ids.shape, generator=g, device="cpu")
        to_mask = chosen & (r < mc.mask_token_prob)
        to_random = chosen & ~to_mask & (r < mc.mask_token_prob + mc.random_token_prob)
        random_ids = self.random_pool[torch.randint(len(self.random_pool), ids.shape, generator=g, device="cpu")]
        inputs = torch.where(to_mask, self.mask_id, torch.where(to_random, random_ids, ids))
        return inputs, target


class MLMExamples:
    """Turns window starts in a token split into a masked-LM batch."""

    def __init__(self, tokens: np.ndarray, seq_len: int, ids: SpecialIds, masker: Masker, nsp: bool):
        if seq_len < 4 + nsp:
            raise UserError(f"config: model.max_seq_len = {seq_len} is too short for [CLS] A [SEP]"
                            f"{' B [SEP]' if nsp else ''}")
        self.tokens, self.seq_len, self.ids, self.masker, self.nsp = tokens, seq_len, ids, masker, nsp
        self.span = seq_len - (3 if nsp else 2)  # tokens of text per example

    def __call__(self, starts: np.ndarray, g: torch.Generator) -> dict[str, torch.Tensor]:
        B, L = len(starts), self.span
        text = torch.from_numpy(self.tokens[starts[:, None] + np.arange(L)].astype(np.int64))
        cls = torch.full((B, 1), self.ids.cls, device="cpu")
        sep = torch.full((B, 1), self.ids.sep, device="cpu")
        batch = {}
        if not self.nsp:
            ids = torch.cat([cls, text, sep], dim=1)
            segments = torch.zeros_like(ids)
        else:
            len_a = torch.randint(1, L, (B, 1), generator=g, device="cpu")
            is_next = torch.rand(B, generator=g, device="cpu") < 0.5
            other = torch.randint(len(self.tokens) - L, (B,), generator=g, device="cpu").numpy()
            elsewhere = torch.from_numpy(self.tokens[other[:, None] + np.arange(L)].astype(np.int64))
            pos = torch.arange(L, device="cpu")[None, :]
            b_from_elsewhere = elsewhere.gather(1, (pos - len_a).clamp(min=0))
            text = torch.where((pos < len_a) | is_next[:, None], text, b_from_elsewhere)
            # [CLS] text[:len_a] [SEP] text[len_a:] [SEP]: output position k (1..L+1) holds text[k-1] before
            # the first separator and text[k-2] after it.
            k = torch.arange(1, L + 2, device="cpu").expand(B, -1)
            middle = torch.where(k - 1 < len_a, text.gather(1, (k - 1).clamp(max=L - 1)),
                                 text.gather(1, (k - 2).clamp(min=0)))
            middle = torch.where(k - 1 == len_a, self.ids.sep, middle)
            ids = torch.cat([cls, middle, sep], dim=1)
            segments = (torch.arange(self.seq_len, device="cpu")[None, :] > len_a + 1).long()
            batch["nsp_label"] = (~is_next).long()
        batch["input"], batch["target"] = self.masker(ids, g)
        batch["segments"] = segments
        return batch


class MLMBatches:
    """Endless masked-LM batches at random offsets. The generator is the whole position (offsets,
    masking, NSP draws), so a checkpoint of it resumes exactly; with several ranks each keeps its
    slice of one global batch, as data.batches.RandomWindows does."""

    def __init__(self, examples: MLMExamples, batch_size: int, seed: int, shard: tuple[int, int] = (0, 1)):
        self.examples, self.batch_size = examples, batch_size
        self.rank, self.world = shard
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        high = len(self.examples.tokens) - self.examples.span
        starts = torch.randint(high, (self.batch_size * self.world,), generator=self.generator, device="cpu").numpy()
        batch = self.examples(starts, self.generator)
        return {k: v[self.rank * self.batch_size:(self.rank + 1) * self.batch_size] for k, v in batch.items()}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def mlm_eval_batches(examples: MLMExamples, batch_size: int, max_batches: int, seed: int = 0):
    """The same batches at every evaluation: windows laid end to end over the split (or max_batches
    batches of windows spread evenly over it), masked with a fixed seed."""
    n = len(examples.tokens)
    starts = np.arange(0, n - examples.span + 1, examples.span)
    if max_batches and len(starts) > max_batches * batch_size:
        starts = starts[np.linspace(0, len(starts) - 1, max_batches * batch_size).round().astype(int)]
    g = torch.Generator(device="cpu").manual_seed(seed)
    for i in range(0, len(starts), batch_size):
        yield examples(starts[i:i + batch_size], g)
