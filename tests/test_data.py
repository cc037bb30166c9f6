"""Data: tokenizers, corpus readers, the token store and its cache, and the batch samplers."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch

import lmforge.data.store as store
from helpers import shakespeare_text, synthetic_text, write_corpus
from lmforge.config import load_config
from lmforge.data.batches import RandomWindows, eval_windows
from lmforge.losses import IGNORE_INDEX
from lmforge.data.formats import read_corpus
from lmforge.data.store import prepare_tokens
from lmforge.data.tokenizer import eos_id, load_tokenizer, train_tokenizer
from lmforge.errors import UserError

ODD_TEXT = "Héllo — “quoted” 你好, naïve café!\n\tTabs  and  double  spaces.\r\nThe end.\n"


def data_cfg(tmp_path, path, **extra):
    over = {"data.path": str(path), "data.cache_dir": str(tmp_path / "cache"), "data.tokenizer.kind": "char",
            **{k.replace("__", "."): v for k, v in extra.items()}}
    return load_config(overrides=over).data


def ids_of(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


# -- tokenizers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_tokenizer_round_trip_and_save_load(kind, tmp_path):
    corpus = shakespeare_text(50_000) if kind == "bpe" else synthetic_text(5000)
    tok = train_tokenizer([corpus, ODD_TEXT], kind, 500, ["<|endoftext|>"])
    for text in (ODD_TEXT, corpus[:2000], "a", " leading and trailing "):
        assert tok.decode(ids_of(tok, text)) == text
    if kind == "bpe":
        assert len(ids_of(tok, corpus[:2000])) < 2000 / 2  # merges were learned
        assert tok.get_vocab_size() == 500
    else:
        assert ids_of(tok, "the king") == [tok.token_to_id(c) for c in "the king"]
    assert tok.token_to_id("<|endoftext|>") == eos_id(tok)

    tok.save(str(tmp_path / "tokenizer.json"))
    for where in (tmp_path / "tokenizer.json", tmp_path):
        again = load_tokenizer(where)
        assert ids_of(again, ODD_TEXT) == ids_of(tok, ODD_TEXT)
        assert again.to_str() == tok.to_str()


def test_bpe_round_trips_text_it_never_saw():
    tok = train_tokenizer([synthetic_text(3000)], "bpe", 300, ["<|endoftext|>"])
    text = "Zebra ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00 ends"
    assert tok.decode(ids_of(tok, text)) == text


def test_char_tokenizer_vocab_bound_unknowns_and_lowercase():
    text = "aaaa bbb cc d XYZ"
    tok = train_tokenizer([text], "char", 6, ["<|endoftext|>"])
    vocab = tok.get_vocab()
    assert len(vocab) == 6  # 2 specials + the 4 most frequent characters
    assert set(vocab) == {"<|endoftext|>", "<unk>", "a", " ", "b", "c"}
    assert ids_of(tok, "ad") == [vocab["a"], vocab["<unk>"]]
    low = train_tokenizer(["ABC abc"], "char", 100, ["<|endoftext|>"], lowercase=True)
    assert ids_of(low, "CAB") == ids_of(low, "cab")
    assert low.token_to_id("A") is None


def test_wordpiece_tokenizer(tmp_path):
    tok = train_tokenizer([synthetic_text(20_000)], "wordpiece", 200, ["<|endoftext|>"])
    enc = tok.encode("the king shall speak")
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    assert "[UNK]" not in enc.tokens
    assert tok.decode(enc.ids) == "the king shall speak"
    assert eos_id(tok) == tok.token_to_id("<|endoftext|>")
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).encode("the king shall speak").ids == enc.ids


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


# -- the token store -------------------------------------------------------------------------------


def test_store_matches_direct_encoding_and_splits_the_last_fraction(tmp_path):
    text = synthetic_text(150_000)  # more than two 64 KB pieces
    path = write_corpus(tmp_path, text)
    splits = prepare_tokens(data_cfg(tmp_path, path, data__val_fraction=0.15), seq_len=16)
    tok = splits.tokenizer
    expected = ids_of(tok, text) + [eos_id(tok)]
    n_val = int(round(len(expected) * 0.15))
    assert len(expected) == len(text) + 1
    assert splits.train.tolist() == expected[:-n_val]
    assert splits.val.tolist() == expected[-n_val:]
    assert tok.decode(splits.val.tolist()) == text[-(n_val - 1):]


def test_store_is_reused_and_rebuilt_when_the_corpus_changes(tmp_path, monkeypatch):
    path = write_corpus(tmp_path, synthetic_text(20_000))
    cfg = data_cfg(tmp_path, path)
    first = prepare_tokens(cfg, 16)

    def forbidden(*args, **kwargs):
        raise AssertionError("the cached store/tokenizer should have been reused")

    with monkeypatch.context() as m:
        m.setattr(store, "_encode", forbidden)
        m.setattr(store, "train_tokenizer", forbidden)
        second = prepare_tokens(cfg, 16)
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)
    assert second.tokenizer.to_str() == first.tokenizer.to_str()

    # another split of the same corpus: a new store, the same tokenizer
    calls = Counter()
    real_encode, real_train = store._encode, store.train_tokenizer
    monkeypatch.setattr(store, "_encode", lambda *a: (calls.update(["encode"]), real_encode(*a))[1])
    monkeypatch.setattr(store, "train_tokenizer", lambda *a: (calls.update(["train"]), real_train(*a))[1])
    other = prepare_tokens(data_cfg(tmp_path, path, data__val_fraction=0.2), 16)
    assert calls == {"encode": 1}
    assert np.array_equal(np.concatenate([other.train, other.val]), np.concatenate([first.train, first.val]))

    # the same file name with other content: encoded again, with a tokenizer trained on it
    path.write_text(synthetic_text(20_000, seed=1) + "Zz\n", encoding="utf-8")
    changed = prepare_tokens(cfg, 16)
    assert calls == {"encode": 2, "train": 1}
    assert changed.tokenizer.token_to_id("Z") is not None
    assert changed.tokenizer.decode(changed.val.tolist()).endswith("Zz\n")
    assert len(list((tmp_path / "cache").glob("store-*"))) == 3
    assert not list((tmp_path / "cache").glob("*.tmp-*"))


def test_store_dtype_follows_the_vocabulary_size(tmp_path):
    small = prepare_tokens(data_cfg(tmp_path, write_corpus(tmp_path, synthetic_text(5000))), 16)
    assert small.train.dtype == np.uint16

    # 70,000 distinct characters: ids past 65,535 need uint32
    chars = [chr(0x4E00 + i) for i in range(20_000)] + [chr(0x20000 + i) for i in range(50_000)]
    text = "".join(chars) + "".join(chars[::-1])
    path = write_corpus(tmp_path, text, "wide.txt")
    big = prepare_tokens(data_cfg(tmp_path, path, data__tokenizer__vocab_size=80_000), 16)
    assert big.tokenizer.get_vocab_size() > 1 << 16
    assert big.train.dtype == np.uint32
    ids = np.concatenate([big.train, big.val]).tolist()
    assert max(ids) > 1 << 16
    assert big.tokenizer.decode(ids[:-1]) == text


def test_folder_reader(tmp_path):
    folder = tmp_path / "docs"
    (folder / "a").mkdir(parents=True)
    (folder / "b.txt").write_text("second document\n" * 40)
    (folder / "a" / "c.txt").write_text("first document\n" * 40)
    (folder / "notes.md").write_text("not read\n" * 40)
    splits = prepare_tokens(data_cfg(tmp_path, folder, data__val_fraction=0.3), 16)
    tok = splits.tokenizer
    eos = eos_id(tok)
    expected = ids_of(tok, "first document\n" * 40) + [eos] + ids_of(tok, "second document\n" * 40) + [eos]
    assert np.concatenate([splits.train, splits.val]).tolist() == expected
    assert tok.token_to_id("m") is not None and tok.token_to_id("o") is not None
    assert tok.token_to_id("r") is not None and tok.token_to_id("x") is None  # notes.md was not read
    meta = json.loads(next((tmp_path / "cache").glob("store-*/meta.json")).read_text())
    assert meta["documents"] == 2 and meta["tokens"] == len(expected)


def code_folder(tmp_path):
    """A folder of source files and notes, no .txt among them."""
    folder = tmp_path / "repo"
    (folder / "pkg").mkdir(parents=True)
    (folder / "pkg" / "a.py").write_text("def add(a, b):\n    return a + b\n" * 40)
    (folder / "pkg" / "b.py").write_text("class Point:\n    x = 0\n" * 40)
    (folder / "README.md").write_text("# notes on the code\n" * 40)
    (folder / "LICENSE").write_text("free to use\n")
    # hidden files and folders (a virtualenv, git's objects, an editor's) are not the project's text
    (folder / ".venv" / "lib").mkdir(parents=True)
    (folder / ".venv" / "lib" / "site.py").write_text("import os\n" * 40)
    (folder / ".notes.md").write_text("# private\n")
    return folder


def test_a_folder_without_the_extensions_names_what_it_holds(tmp_path):
    with pytest.raises(UserError) as e:
        prepare_tokens(data_cfg(tmp_path, code_folder(tmp_path)), 16)
    assert str(e.value) == (f"data: {tmp_path / 'repo'}: the folder holds no .txt files (it has 2 .py, 1 (no extension), "
                            "1 .md); set data.extensions")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"holds no \.md files \(it is empty\)"):
        prepare_tokens(data_cfg(tmp_path, tmp_path / "empty", data__extensions=".md"), 16)


def test_data_extensions_choose_the_files_of_a_folder(tmp_path):
    folder = code_folder(tmp_path)
    # as on the command line: --data.extensions .py,.md
    splits = prepare_tokens(data_cfg(tmp_path, folder, data__extensions=".py,.md"), 16)
    tok = splits.tokenizer
    read = [folder / "README.md", folder / "pkg" / "a.py", folder / "pkg" / "b.py"]  # in path order
    expected = [i for f in read for i in ids_of(tok, f.read_text()) + [eos_id(tok)]]
    assert np.concatenate([splits.train, splits.val]).tolist() == expected

    # other extensions pick other files: another token store, not the cached one
    py_only = prepare_tokens(data_cfg(tmp_path, folder, data__extensions=".py"), 16)
    assert len(py_only.train) + len(py_only.val) < len(expected)
    assert len(list((tmp_path / "cache").glob("store-*"))) == 2

    with pytest.raises(UserError, match=r"data.extensions = \['py'\]: must be one or more file name endings"):
        data_cfg(tmp_path, folder, data__extensions="py")


def test_jsonl_reader_with_text_field(tmp_path):
    docs = [f"record number {i} says hello\n" * 3 for i in range(30)]
    lines = [json.dumps({"id": i, "body": d}) for i, d in enumerate(docs)]
    lines.insert(5, "")  # blank lines are skipped
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    splits = prepare_tokens(data_cfg(tmp_path, path, data__text_field="body"), 16)
    tok = splits.tokenizer
    expected = [i for d in docs for i in ids_of(tok, d) + [eos_id(tok)]]
    assert np.concatenate([splits.train, splits.val]).tolist() == expected
    # an explicit format wins over the suffix
    txt_named = tmp_path / "data.txt"
    txt_named.write_text(path.read_text())
    pieces = list(read_corpus(txt_named, "jsonl", "body"))
    assert [t for t, _ in pieces] == docs and all(ends for _, ends in pieces)


def test_a_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffhello\nworld\n".encode("utf-8"))
    assert [t for t, _ in read_corpus(tmp_path / "bom.txt", "txt", "text")] == ["hello\nworld\n"]
    (tmp_path / "bom.jsonl").write_bytes('\ufeff{"text": "hi"}\n'.encode("utf-8"))  # json.loads refuses a BOM
    assert [t for t, _ in read_corpus(tmp_path / "bom.jsonl", "jsonl", "text")] == ["hi"]


def test_reader_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: field 'text' is int"):
        list(read_corpus(path, "jsonl", "text"))
    path.write_bytes(b"fine\nfine\nbad \xe9 byte\n")
    with pytest.raises(UserError, match=r"bad.jsonl:3: .*UTF-8"):
        list(read_corpus(path, "txt", "text"))
    with pytest.raises(UserError, match="data.format = folder"):
        prepare_tokens(data_cfg(tmp_path, path, data__format="folder"), 16)
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(UserError, match="empty"):
        list(read_corpus(tmp_path / "blank.txt", "txt", "text"))


def test_corpus_shorter_than_a_context_window(tmp_path):
    path = write_corpus(tmp_path, "x" * 200)
    with pytest.raises(UserError, match="model.max_seq_len = 32"):
        prepare_tokens(data_cfg(tmp_path, path), 32)  # 20 val tokens < 33
    assert len(prepare_tokens(data_cfg(tmp_path, path), 16).val) == 20


# -- batches ---------------------------------------------------------------------------------------


def scored_positions(tokens, seq_len, batch_size, max_batches=0):
    """Positions of every scored target, checking each window along the way."""
    seen, n_batches = [], 0
    for batch in eval_windows(tokens, seq_len, batch_size, max_batches):
        n_batches += 1
        inp, tgt = batch["input"], batch["target"]
        assert inp.shape == tgt.shape and inp.shape[1] == seq_len and inp.shape[0] <= batch_size
        real = tgt != IGNORE_INDEX
        assert torch.equal(tgt[real], inp[real] + 1)  # tokens are positions: a target is its input's successor
        seen += tgt[real].tolist()
    return seen, n_batches


@pytest.mark.parametrize("seq_len", [1, 4, 7])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_eval_windows_score_every_target_exactly_once(seq_len, batch_size):
    for n in range(seq_len + 1, 6 * seq_len + 4):
        tokens = np.arange(n, dtype=np.uint16)
        seen, _ = scored_positions(tokens, seq_len, batch_size)
        assert sorted(seen) == list(range(1, n)), n


def test_eval_windows_with_max_batches():
    seq_len, batch_size, n = 8, 4, 1003
    tokens = np.arange(n, dtype=np.uint16)
    seen, n_batches = scored_positions(tokens, seq_len, batch_size, max_batches=3)
    assert n_batches == 3
    assert len(seen) == len(set(seen))  # nothing scored twice
    assert len(seen) > 10 * seq_len
    assert min(seen) <= seq_len and max(seen) == n - 1  # spread from the start to the end
    assert scored_positions(tokens, seq_len, batch_size, max_batches=1000)[0] == scored_positions(tokens, seq_len, batch_size)[0]


def test_random_windows_are_windows_and_resume_exactly():
    tokens = np.arange(500, dtype=np.uint16)
    sampler = RandomWindows(tokens, 8, 4, seed=1)
    for _ in range(3):
        b = next(sampler)
        assert b["input"].shape == (4, 8) and b["input"].dtype == torch.int64
        assert torch.equal(b["target"], b["input"] + 1)
        assert torch.equal(b["input"][:, 1:], b["input"][:, :-1] + 1)
    buf = io.BytesIO()
    torch.save(sampler.state_dict(), buf)  # as a checkpoint stores it
    expected = [next(sampler) for _ in range(3)]

    resumed = RandomWindows(tokens, 8, 4, seed=999)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for want, got in zip(expected, (next(resumed) for _ in range(3))):
        assert torch.equal(want["input"], got["input"]) and torch.equal(want["target"], got["target"])
    fresh = RandomWindows(tokens, 8, 4, seed=1)
    assert not torch.equal(next(fresh)["input"], expected[0]["input"])


def test_random_windows_reach_both_ends():
    tokens = np.arange(10, dtype=np.uint16)
    sampler = RandomWindows(tokens, 8, 16, seed=0)
    starts = set()
    for _ in range(20):
        b = next(sampler)
        assert int(b["target"].max()) <= 9
        starts |= set(b["input"][:, 0].tolist())
    assert starts == {0, 1}


def test_tokenizer_cli_and_reusing_a_tokenizer_file(tmp_path, capsys, monkeypatch):
    from lmforge.cli import main

    path = write_corpus(tmp_path, synthetic_text(20_000))
    assert main(["tokenizer", "train", "--input", str(path), "--out", str(tmp_path / "tok"), "--kind", "bpe",
                 "--vocab-size", "300"]) == 0
    assert "300 tokens" in capsys.readouterr().out
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.get_vocab_size() == 300 and tok.decode(ids_of(tok, ODD_TEXT)) == ODD_TEXT

    # data.tokenizer.path: that tokenizer is used as is, none is trained
    def forbidden(*args, **kwargs):
        raise AssertionError("no tokenizer should be trained when data.tokenizer.path is set")

    monkeypatch.setattr(store, "train_tokenizer", forbidden)
    splits = prepare_tokens(data_cfg(tmp_path, path, data__tokenizer__path=str(tmp_path / "tok")), 16)
    assert splits.tokenizer.to_str() == tok.to_str()
    assert np.concatenate([splits.train, splits.val]).tolist() == ids_of(tok, path.read_text()) + [eos_id(tok)]
