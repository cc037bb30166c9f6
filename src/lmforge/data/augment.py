"""Word-level text augmentation for fine-tuning (robust.augment): delete, swap or mask a share of the words.

With tags (token classification) the tags stay aligned with the words: delete and swap only touch words
tagged outside (`O`), so an entity is never broken or moved apart, and mask keeps each word's tag.
"""

from __future__ import annotations

import random

from lmforge.errors import UserError

AUGMENT_OPS = ("delete", "swap", "mask")


def check_ops(ops: list[str]) -> None:
    """UserError for an operation name that is not delete, swap or mask."""
    for op in ops:
        if op not in AUGMENT_OPS:
            raise UserError(f"robust.augment: unknown operation {op!r}; expected any of {', '.join(AUGMENT_OPS)}")


def augment(words: list[str], rng: random.Random, ops: list[str], rate: float, mask_token: str,
            tags: list | None = None, outside: object = "O") -> tuple[list[str], list | None]:
    """One operation drawn from `ops` applied to about `rate` of the words (at least one word):

    - delete: removes words, never all of them (at least one word stays);
    - swap: exchanges the words at random pairs of positions (one pair per affected word);
    - mask: replaces words with `mask_token`.

    With `tags` (one per word), delete and swap only pick words whose tag is `outside` ("O"; pass the O
    index when the tags are indices) and mask keeps the tags, so the returned tags match the returned
    words. Returns new lists (the inputs are not changed); (words, None) without tags. The result depends
    only on the inputs and the state of `rng`. Inputs too short for the drawn operation come back unchanged.
    """
    check_ops(ops)
    words = list(words)
    tags = None if tags is None else list(tags)
    if tags is not None and len(tags) != len(words):
        raise ValueError(f"{len(words)} words but {len(tags)} tags")
    if not ops or not words:
        return words, tags
    op = rng.choice(list(ops))
    k = max(1, round(rate * len(words)))
    if op == "mask":
        for i in rng.sample(range(len(words)), min(k, len(words))):
            words[i] = mask_token
        return words, tags
    free = [i for i in range(len(words)) if tags is None or tags[i] == outside]
    if op == "delete":
        k = min(k, len(free), len(words) - 1)
        if k <= 0:
            return words, tags
        gone = set(rng.sample(free, k))
        keep = [i for i in range(len(words)) if i not in gone]
        return [words[i] for i in keep], None if tags is None else [tags[i] for i in keep]
    # swap
    if len(free) < 2:
        return words, tags
    for _ in range(k):
        i, j = rng.sample(free, 2)
        words[i], words[j] = words[j], words[i]
        if tags is not None:
            tags[i], tags[j] = tags[j], tags[i]
    return words, tags
