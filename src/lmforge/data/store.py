"""The token store: a corpus encoded once into a flat array on disk (a numpy memmap of uint16 or
uint32), keyed by the corpus bytes and the tokenizer, so a later run with the same inputs reuses it.
The last `val_fraction` of the tokens is the validation split."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from lmforge.data.formats import corpus_files, embedded_corpus, read_corpus, resolve_format
from lmforge.data.tokenizer import eos_id, load_tokenizer, save_tokenizer, train_tokenizer
from lmforge.errors import UserError
from lmforge.io import atomic_dir

STORE_VERSION = 1
ENCODE_BATCH = 256  # pieces per encode_batch call (the tokenizers library encodes them in parallel)


@dataclass
class TokenSplits:
    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    source: Path


def _digest(*parts: str | bytes) -> str:
    h = hashlib.blake2b(digest_size=12)
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def corpus_digest(files: list[Path]) -> str:
    h = hashlib.blake2b(digest_size=12)
    for f in files:
        h.update(str(f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def prepare_tokens(data_cfg, seq_len: int) -> TokenSplits:
    """Read, tokenise (training a tokenizer if none is given) and split the corpus, reusing the cache."""
    path = Path(data_cfg.path) if data_cfg.path else embedded_corpus()
    fmt = resolve_format(path, data_cfg.format)
    files = corpus_files(path, fmt)
    corpus_key = _digest(corpus_digest(files), fmt, data_cfg.text_field)
    cache = Path(data_cfg.cache_dir)
    pieces = lambda: read_corpus(path, fmt, data_cfg.text_field)  # noqa: E731

    tc = data_cfg.tokenizer
    if tc.path:
        tok = load_tokenizer(tc.path)
    else:  # train one, or reuse the one trained before on the same corpus with the same settings
        tok_file = cache / f"tokenizer-{_digest(corpus_key, tc.kind, str(tc.vocab_size), *tc.special_tokens, str(tc.lowercase))}.json"
        if tok_file.is_file():
            tok = load_tokenizer(tok_file)
        else:
            tok = train_tokenizer((text for text, _ in pieces()), tc.kind, tc.vocab_size, tc.special_tokens, tc.lowercase)
            save_tokenizer(tok, tok_file, parents=True)  # a full disk is one line and leaves no temp file

    store = cache / f"store-{_digest(corpus_key, tok.to_str(), str(data_cfg.val_fraction), str(STORE_VERSION))}"
    if not (store / "meta.json").is_file():
        try:
            atomic_dir(store, lambda tmp: _encode(pieces(), tok, tmp, data_cfg.val_fraction, str(path)))
        except (OSError, UserError):  # atomic_dir reports a refused write as a UserError
            if not (store / "meta.json").is_file():  # a real I/O failure, not another process winning the rename
                raise
    meta = json.loads((store / "meta.json").read_text())
    tokens = np.memmap(store / "tokens.bin", dtype=meta["dtype"], mode="r")
    train, val = tokens[:meta["split"]], tokens[meta["split"]:]
    need = seq_len + 1
    if len(train) < need or len(val) < need:
        raise UserError(f"data: {path}: {len(train)} train and {len(val)} val tokens; each split needs at least "
                        f"{need} (one context window of model.max_seq_len = {seq_len} plus one) - use a longer corpus, "
                        "a shorter context or another data.val_fraction")
    return TokenSplits(train, val, tok, path)


def _encode(pieces, tok: Tokenizer, out: Path, val_fraction: float, source: str) -> None:
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    eos = eos_id(tok)
    total, docs = 0, 0
    with open(out / "tokens.bin", "wb") as f:
        def flush(batch):
            nonlocal total
            for enc, ends in zip(tok.encode_batch([t for t, _ in batch], add_special_tokens=False), (e for _, e in batch)):
                ids = enc.ids + ([eos] if ends and eos is not None else [])
                np.asarray(ids, dtype=dtype).tofile(f)
                total += len(ids)

        batch = []
        for text, ends in pieces:
            docs += ends
            batch.append((text, ends))
            if len(batch) == ENCODE_BATCH:
                flush(batch)
                batch = []
        flush(batch)
        f.flush()
        os.fsync(f.fileno())
    split = total - int(round(total * val_fraction))
    meta = {"version": STORE_VERSION, "source": source, "dtype": np.dtype(dtype).name, "tokens": total,
            "split": split, "documents": docs, "vocab_size": vocab}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
