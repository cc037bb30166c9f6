"""The token store: a corpus encoded once into a flat array on disk (a numpy memmap of uint16 or
uint32), keyed by the corpus bytes and the tokenizer, so a later run with the same inputs reuses it.
The last `val_fraction` of the tokens is the validation split."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from lmforge.data.formats import corpus_files, embedded_corpus, read_corpus, resolve_format
from lmforge.data.tokenizer import eos_id, load_tokenizer, save_tokenizer, train_tokenizer
from lmforge.errors import UserError
from lmforge.io import atomic_dir, sweep_temps

STORE_VERSION = 1
ENCODE_BATCH = 256  # pieces per encode_batch call (the tokenizers library encodes them in parallel)


@dataclass
class TokenSplits:
    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    source: Path
    files: list[Path]  # the files read (a folder's: those with the data.extensions)

    def summary(self) -> str:
        """Where the tokens came from and how they split, for a person: "data/kjv.txt: 1 file, 4.35 MB, 1.05M
        tokens (train 944k, val 105k)"."""
        size = sum(f.stat().st_size for f in self.files)
        return (f"{self.source}: {len(self.files)} file{'s' if len(self.files) != 1 else ''}, {amount(size, 'B')}, "
                f"{amount(len(self.train) + len(self.val))} tokens (train {amount(len(self.train))}, "
                f"val {amount(len(self.val))})")


def amount(n: float, unit: str = "") -> str:
    """n to three significant digits with a decimal prefix: 812, 10.5k, 1.05M; with a unit, 4.35 MB."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, "")):
        if n >= scale * 0.9995 or scale == 1:  # 999,600 is 1M, not 1e+03k
            return f"{n / scale:.3g}{' ' if unit else ''}{prefix}{unit}"


def _digest(*parts: str | bytes) -> str:
    h = hashlib.blake2b(digest_size=12)
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)


def corpus_digest(files: list[Path]) -> str:
    h = hashlib.blake2b(digest_size=12)
    for f in files:
        h.update(str(f.name).encode())
        _hash_file(h, f)
    return h.hexdigest()


def file_checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    _hash_file(h, path)
    return h.hexdigest()


def prepare_tokens(data_cfg, seq_len: int) -> TokenSplits:
    """Read, tokenise (training a tokenizer if none is given) and split the corpus, reusing the cache."""
    path = Path(data_cfg.path) if data_cfg.path else embedded_corpus()
    fmt = resolve_format(path, data_cfg.format)
    files = corpus_files(path, fmt, data_cfg.extensions)
    # the files read, by name and content: data.extensions that pick other files give another key
    corpus_key = _digest(corpus_digest(files), fmt, data_cfg.text_field)
    cache = Path(data_cfg.cache_dir)
    pieces = lambda: read_corpus(path, fmt, data_cfg.text_field, files)  # noqa: E731

    sweep_temps(cache)  # what killed writes left (a tokenizer, a half-encoded store)
    tc = data_cfg.tokenizer
    if tc.path:
        tok = load_tokenizer(tc.path)
    else:  # train one, or reuse the one trained before on the same corpus with the same settings
        tok_file = cache / f"tokenizer-{_digest(corpus_key, tc.kind, str(tc.vocab_size), *tc.special_tokens, str(tc.lowercase))}.json"
        tok = _cached_tokenizer(tok_file)
        if tok is None:
            tok = train_tokenizer((text for text, _ in pieces()), tc.kind, tc.vocab_size, tc.special_tokens, tc.lowercase)
            save_tokenizer(tok, tok_file, parents=True)  # a full disk is one line and leaves no temp file

    store = cache / f"store-{_digest(corpus_key, tok.to_str(), str(data_cfg.val_fraction), str(STORE_VERSION))}"
    meta = _checked_meta(store)
    if meta is None:
        try:
            atomic_dir(store, lambda tmp: _encode(pieces(), tok, tmp, data_cfg.val_fraction, str(path)))
        except UserError:  # atomic_dir reports a refused write as a UserError
            if _checked_meta(store) is None:  # a real I/O failure, not another process winning the rename
                raise
        meta = json.loads((store / "meta.json").read_text())
    tokens = np.memmap(store / "tokens.bin", dtype=meta["dtype"], mode="r")
    train, val = tokens[:meta["split"]], tokens[meta["split"]:]
    need = seq_len + 1
    if len(train) < need or len(val) < need:
        raise UserError(f"data: {path}: {len(train)} train and {len(val)} val tokens; each split needs at least "
                        f"{need} (one context window of model.max_seq_len = {seq_len} plus one) - use a longer corpus, "
                        "a shorter context or another data.val_fraction")
    return TokenSplits(train, val, tok, path, files)


def _cached_tokenizer(path: Path) -> Tokenizer | None:
    """The tokenizer trained before on this corpus, or None to train it (again, with a note, if the file is damaged)."""
    if not path.is_file():
        return None
    try:
        return load_tokenizer(path)
    except UserError as e:
        print(f"lmforge: note: the cached tokenizer cannot be read ({e}); training it again", file=sys.stderr)
        path.unlink(missing_ok=True)
        return None


META_KEYS = {"version": int, "dtype": str, "tokens": int, "split": int, "bytes": int, "checksum": str}


def _read_store(store: Path) -> tuple[dict | None, str | None]:
    """(a token store's meta.json, None) when the store matches it, else (None, why it cannot be trusted). The
    record is meta.json: the size and checksum of tokens.bin as written. A file cut short or damaged since
    would otherwise train on fewer tokens, or on wrong ones, without a word."""
    try:
        meta = json.loads((store / "meta.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"meta.json cannot be read ({type(e).__name__})"
    wrong = [k for k, kind in META_KEYS.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), kind)]
    if wrong:
        return None, f"meta.json lacks {', '.join(wrong)} (written by an older lmforge, or damaged)"
    problem = _size_or_checksum_problem(store, meta)
    return (None, problem) if problem else (meta, None)


def _size_or_checksum_problem(store: Path, meta: dict) -> str | None:
    tokens = store / "tokens.bin"
    size = tokens.stat().st_size if tokens.is_file() else -1
    if meta["dtype"] not in ("uint16", "uint32") or not 0 <= meta["split"] <= meta["tokens"] \
            or meta["bytes"] != meta["tokens"] * np.dtype(meta["dtype"]).itemsize:
        return "meta.json's sizes do not agree with each other"
    if size != meta["bytes"]:
        return f"tokens.bin holds {size} bytes, its record {meta['bytes']}"
    if file_checksum(tokens) != meta["checksum"]:  # ~1 s per GB, once per run: the price of never training on garbage
        return "tokens.bin's checksum differs from its record"
    return None


def _checked_meta(store: Path) -> dict | None:
    """A token store's meta.json when the store matches it; None when there is none yet or it must be built
    again (then the damaged store is removed, with a note)."""
    if not store.exists():
        return None
    meta, problem = _read_store(store)
    if problem is None:
        return meta
    print(f"lmforge: note: the token cache {store} does not match its record ({problem}); building it again",
          file=sys.stderr)
    shutil.rmtree(store, ignore_errors=True)
    return None


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
            "split": split, "documents": docs, "vocab_size": vocab, "bytes": total * np.dtype(dtype).itemsize,
            "checksum": file_checksum(out / "tokens.bin")}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))  # inside atomic_dir's temporary folder
