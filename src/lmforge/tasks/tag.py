"""Token classification (NER): a tag per word. Words are split into sub-word tokens; the first
sub-token of each word carries the word's tag and the rest are ignored by the loss, and predictions
are read back at the first sub-tokens, so metrics and outputs are per word (entity-level F1 by
seqeval)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from lmforge.data.batches import pad_batch
from lmforge.data.labelled import Example
from lmforge.losses import IGNORE_INDEX, LOSSES, loss_options
from lmforge.metrics import EntityMetrics
from lmforge.tasks.finetune import Encoded, FinetuneTask


# -- sub-word alignment -----------------------------------------------------------------------------

_PLAIN: dict[int, tuple[object, object]] = {}  # id(tokenizer) -> (tokenizer, copy without padding/truncation)


def _plain(tok):
    """The tokenizer itself, or (when it pads or truncates on its own, like many tokenizer.json files from
    the hub) a cached copy that does neither; the caller's tokenizer is never changed."""
    if tok.padding is None and tok.truncation is None:
        return tok
    hit = _PLAIN.get(id(tok))
    if hit is None or hit[0] is not tok:
        copy = Tokenizer.from_str(tok.to_str())
        copy.no_padding()
        copy.no_truncation()
        hit = _PLAIN[id(tok)] = (tok, copy)
    return hit[1]


def align_words(tok, words: list[str], tags: list[int] | None, max_length: int, cls_id: int | None,
                sep_id: int | None, ignore_index: int = -100) -> tuple[list[int], list[int], list[int]]:
    """Token ids for a pre-split sentence, with word-level tags moved onto sub-tokens.

    Returns (ids, targets, word_starts): ids = [CLS] + sub-tokens + [SEP] (each special only when its id is
    not None), at most `max_length` in all; targets[i] = the word's tag index at the first sub-token of each
    word, `ignore_index` elsewhere (later sub-tokens, specials, everything when `tags` is None);
    word_starts[j] = the position of word j's first sub-token, or -1 when truncation cut the word off or
    the word produced no tokens."""
    if tags is not None and len(tags) != len(words):
        raise ValueError(f"{len(words)} words but {len(tags)} tags")
    n_special = (cls_id is not None) + (sep_id is not None)
    budget = max_length - n_special
    if budget < 1:
        raise ValueError(f"max_length {max_length} leaves no room for tokens beside the special tokens")
    word_starts = [-1] * len(words)
    ids: list[int] = [] if cls_id is None else [cls_id]
    targets: list[int] = [] if cls_id is None else [ignore_index]
    if words:
        enc = _plain(tok).encode(words, is_pretokenized=True, add_special_tokens=False)
        for token_id, w in zip(enc.ids, enc.word_ids):
            if w is None:
                continue
            if len(ids) - (cls_id is not None) >= budget:
                break
            if word_starts[w] == -1:
                word_starts[w] = len(ids)
                targets.append(ignore_index if tags is None else tags[w])
            else:
                targets.append(ignore_index)
            ids.append(token_id)
    if sep_id is not None:
        ids.append(sep_id)
        targets.append(ignore_index)
    return ids, targets, word_starts


class TagTask(FinetuneTask):
    name = "tag"
    default_metric = "entity_f1"

    def encode_all(self, examples: list[Example], path: str) -> list[Encoded]:
        rows = []
        cls, sep = (self.cls_id, self.sep_id) if self.encoder else (None, None)
        for e in examples:
            tags = [self.labels.index(t, e, path) for t in e.label] if e.label is not None else None
            ids, target, starts = align_words(self.tokenizer, e.text, tags, self.max_length, cls, sep, IGNORE_INDEX)
            rows.append(Encoded(ids, None, target, starts))
        return rows

    def targets(self, rows, examples) -> dict[str, torch.Tensor]:
        return {"target": pad_batch([r.target for r in rows], IGNORE_INDEX)}

    def loss_from(self, outputs, batch) -> torch.Tensor:
        return LOSSES[self.cfg.loss.name](outputs.flatten(0, 1), batch["target"].flatten(), reduction="sum",
                                          **loss_options(self.cfg.loss, outputs.device))

    def metric_names(self):
        return ["loss", "entity_f1", "entity_precision", "entity_recall", "token_accuracy"]

    def result_metrics(self):
        return ("entity_f1", "entity_precision", "entity_recall")

    def new_metrics(self):
        return EntityMetrics(self.labels.scheme)

    def word_tags(self, logits: torch.Tensor, rows: list[Encoded]) -> list[list[str]]:
        """Each example's predicted tag per word ('O' for a word cut off by max_length)."""
        pred = logits.argmax(-1).cpu()
        names = self.labels.labels
        return [[names[int(pred[i, s])] if s >= 0 else "O" for s in r.word_starts] for i, r in enumerate(rows)]

    def update_metrics(self, metrics, outputs, batch, rows, examples) -> None:
        # whole sentences: a word cut off by max_length is predicted 'O' and still scored
        metrics.update(self.word_tags(outputs, rows), [e.label for e in examples])

    def predictions(self, outputs, batch, rows, examples) -> list[dict]:
        return [{"words": e.text, "tags": tags} for e, tags in zip(examples, self.word_tags(outputs, rows))]

