"""Tokenizers trained on the user's corpus with the `tokenizers` library: characters, byte-level
BPE (GPT-2 style) and WordPiece (BERT style). Saved as tokenizer.json next to the model."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmforge.errors import UserError
from lmforge.io import atomic_write

WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "[SEP]", "<eos>")
# Encoder-decoder models: padding, unknown, the decoder's start token and end of sentence, then (span
# corruption only) T5's sentinels, one per corrupted span of an example.
SEQ2SEQ_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def sentinel(i: int) -> str:
    return f"<extra_id_{i}>"


def seq2seq_special_ids(tok: Tokenizer) -> tuple[int, int, int]:
    """(pad, start, end) ids of an encoder-decoder tokenizer, or a one-line UserError."""
    ids = [tok.token_to_id(t) for t in SEQ2SEQ_SPECIALS[:1] + SEQ2SEQ_SPECIALS[2:]]
    for name, i in zip(("<pad>", "<s>", "</s>"), ids):
        if i is None:
            raise UserError(f"tokenizer: no {name} token; expected an encoder-decoder tokenizer (one that a seq2seq "
                            "or span run trained)")
    return ids[0], ids[1], ids[2]


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int, special_tokens: list[str],
                    lowercase: bool = False) -> Tokenizer:
    if kind == "char":
        return _train_char(texts, vocab_size, special_tokens, lowercase)
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        if lowercase:
            tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "wordpiece":
        specials = WORDPIECE_SPECIALS + [t for t in special_tokens if t not in WORDPIECE_SPECIALS]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    else:
        raise UserError(f"tokenizer: unknown kind {kind!r}; expected char, bpe or wordpiece")
    tok.train_from_iterator(texts, trainer)
    if kind == "wordpiece":
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def _train_char(texts: Iterable[str], vocab_size: int, special_tokens: list[str], lowercase: bool) -> Tokenizer:
    # A word-level model over single characters: every character is a pre-token, unknown ones map to <unk>.
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text.lower() if lowercase else text)
    specials = list(special_tokens) + (["<unk>"] if "<unk>" not in special_tokens else [])
    chars = sorted(c for c, _ in counts.most_common(max(vocab_size - len(specials), 1)))
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    return tok


# what a tokenizer of each kind holds whatever vocabulary size it is asked for, besides its special tokens
ALPHABETS = {"char": "<unk>, one character", "bpe": "the 256 bytes", "wordpiece": "the corpus's characters"}


def smallest_vocab(kind: str, specials: list[str]) -> int:
    """The fewest tokens a tokenizer of `kind` holds, before it has seen the corpus: bpe's 256 bytes, char's
    <unk> and one character, wordpiece's own specials and one character (its corpus's alphabet adds more)."""
    if kind == "bpe":
        return 256 + len(set(specials))
    own = {"<unk>"} if kind == "char" else set(WORDPIECE_SPECIALS)
    return len(own | set(specials)) + 1


def check_vocab_size(kind: str, asked: int, holds: int, where: str) -> None:
    """A tokenizer asked for fewer tokens than it `holds` anyway (its alphabet and special tokens) would come
    out larger than asked (bpe: 257 tokens for a size of 0): refused, naming the smallest size that fits."""
    if holds > asked:
        raise UserError(f"{where} = {asked}: a {kind} tokenizer of this corpus holds at least {holds} tokens "
                        f"({ALPHABETS[kind]} and the special tokens); expected {holds} or more")


def save_tokenizer(tok: Tokenizer, path: str | Path, parents: bool = False) -> None:
    """tokenizer.json, whole or not at all (the tokenizers library writes in place and reports a full disk
    as a bare Exception); parents: create the folders above it."""
    atomic_write(Path(path), lambda tmp: tok.save(str(tmp)), parents)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json file, or a run/model folder that holds one."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise UserError(f"tokenizer: {p}: no such file; expected a tokenizer.json or a folder holding one")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # the tokenizers library raises a bare Exception on malformed files
        raise UserError(f"tokenizer: {p}: not a tokenizer.json from the tokenizers library ({e})") from None


def eos_id(tok: Tokenizer) -> int | None:
    """The id that separates documents, if the tokenizer has one."""
    for t in EOS_CANDIDATES:
        i = tok.token_to_id(t)
        if i is not None:
            return i
    return None
