"""Word-level augmentation: each operation's effect, tags kept aligned, determinism, short inputs."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from lmforge.data.augment import augment
from lmforge.errors import UserError

WORDS = "the quick brown fox jumps over the lazy dog near the old river bank".split()  # 14 words
SENT = ["Peter", "Blackburn", "met", "the", "EU", "commission", "in", "New", "York", "on", "Monday", "."]
TAGS = ["B-PER", "I-PER", "O", "O", "B-ORG", "O", "O", "B-LOC", "I-LOC", "O", "O", "O"]


def test_delete():
    out, tags = augment(WORDS, random.Random(0), ["delete"], 0.3, "[MASK]")
    assert tags is None
    assert len(out) == len(WORDS) - round(0.3 * len(WORDS))
    # what is left is the original words in order (a subsequence)
    it = iter(WORDS)
    assert all(w in it for w in out)
    # at least one word goes, and never all of them
    assert len(augment(WORDS, random.Random(0), ["delete"], 0.0, "[MASK]")[0]) == len(WORDS) - 1
    assert len(augment(WORDS, random.Random(0), ["delete"], 1.0, "[MASK]")[0]) == 1


def test_swap():
    out, _ = augment(WORDS, random.Random(1), ["swap"], 0.2, "[MASK]")
    assert Counter(out) == Counter(WORDS) and len(out) == len(WORDS)
    assert out != WORDS
    # a small rate still swaps one pair: exactly two positions differ
    one, _ = augment(["a", "b", "c", "d", "e"], random.Random(5), ["swap"], 0.01, "[MASK]")
    assert sum(x != y for x, y in zip(one, "abcde")) == 2


def test_mask():
    out, _ = augment(WORDS, random.Random(2), ["mask"], 0.25, "[MASK]")
    assert len(out) == len(WORDS)
    changed = [i for i, (x, y) in enumerate(zip(out, WORDS)) if x != y]
    assert len(changed) == round(0.25 * len(WORDS)) and all(out[i] == "[MASK]" for i in changed)
    assert augment(["hi"], random.Random(0), ["mask"], 0.1, "<mask>")[0] == ["<mask>"]


def test_tags_stay_aligned():
    entities = {("Peter", "B-PER"), ("Blackburn", "I-PER"), ("EU", "B-ORG"), ("New", "B-LOC"), ("York", "I-LOC")}
    for seed in range(60):
        for op in ("delete", "swap", "mask"):
            out, tags = augment(SENT, random.Random(seed), [op], 0.4, "[MASK]", tags=TAGS)
            assert len(out) == len(tags)
            if op == "mask":
                assert tags == TAGS
                continue
            # entity words never move, vanish or change tag; the entity spans stay contiguous
            pairs = list(zip(out, tags))
            for e in entities:
                assert e in pairs
            assert pairs[pairs.index(("Peter", "B-PER")) + 1] == ("Blackburn", "I-PER")
            assert pairs[pairs.index(("New", "B-LOC")) + 1] == ("York", "I-LOC")
            assert all(t == "O" for w, t in pairs if (w, t) not in entities)
            if op == "swap":
                assert [p for p in pairs if p in entities] == [p for p in zip(SENT, TAGS) if p in entities]
                assert [i for i, t in enumerate(tags) if t != "O"] == [0, 1, 4, 7, 8]


def test_tag_indices_with_outside():
    tags = [1, 2, 0, 0, 0, 3, 0]
    out, new = augment(list("abcdefg"), random.Random(0), ["delete"], 0.5, "?", tags=tags, outside=0)
    assert len(out) == len(new) == 3  # round(0.5 * 7) = 4 of the four O words go
    assert [(w, t) for w, t in zip(out, new) if t != 0] == [("a", 1), ("b", 2), ("f", 3)]


def test_deterministic_and_inputs_untouched():
    words, tags = list(SENT), list(TAGS)
    a = [augment(words, random.Random(7), ["delete", "swap", "mask"], 0.3, "[MASK]", tags) for _ in range(2)]
    assert a[0] == a[1]
    assert words == SENT and tags == TAGS
    rng = random.Random(11)
    first = [augment(WORDS, rng, ["delete", "swap", "mask"], 0.2, "[MASK]") for _ in range(20)]
    rng = random.Random(11)
    assert [augment(WORDS, rng, ["delete", "swap", "mask"], 0.2, "[MASK]") for _ in range(20)] == first
    # all three operations turn up
    kinds = {"delete" if len(w) < len(WORDS) else "mask" if "[MASK]" in w else "swap" for w, _ in first}
    assert kinds == {"delete", "swap", "mask"}


def test_empty_ops_and_short_inputs():
    assert augment(WORDS, random.Random(0), [], 0.5, "[MASK]") == (WORDS, None)
    assert augment([], random.Random(0), ["delete", "swap", "mask"], 0.5, "[MASK]", tags=[]) == ([], [])
    assert augment(["one"], random.Random(0), ["delete"], 0.9, "[MASK]") == (["one"], None)
    assert augment(["one"], random.Random(0), ["swap"], 0.9, "[MASK]") == (["one"], None)
    # every word in an entity: delete and swap leave it as it is
    ent = (["New", "York"], ["B-LOC", "I-LOC"])
    assert augment(*ent[:1], random.Random(0), ["delete"], 1.0, "[MASK]", tags=ent[1]) == ent
    assert augment(*ent[:1], random.Random(0), ["swap"], 1.0, "[MASK]", tags=ent[1]) == ent
    # one O word beside an entity: it may go, the entity stays
    out = augment(["in", "Paris"], random.Random(0), ["delete"], 1.0, "[MASK]", tags=["O", "B-LOC"])
    assert out == (["Paris"], ["B-LOC"])
    with pytest.raises(UserError, match="robust.augment: unknown operation 'shuffle'; expected any of delete, "
                                        "swap, mask"):
        augment(WORDS, random.Random(0), ["shuffle"], 0.1, "[MASK]")
    with pytest.raises(ValueError):
        augment(["a", "b"], random.Random(0), ["mask"], 0.1, "[MASK]", tags=["O"])
