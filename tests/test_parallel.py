"""Parallel text: aligned files and TSV, their errors, length and ratio filtering."""

from pathlib import Path

import numpy as np
import pytest

from lmforge.data.parallel import Pair, keep_by_length, read_parallel
from lmforge.errors import UserError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def error(*paths) -> str:
    with pytest.raises(UserError) as e:
        read_parallel(*paths)
    return str(e.value)


def test_aligned_files_and_tsv_give_the_same_pairs(tmp_path):
    src = write(tmp_path / "a.en", "\ufeffTwo dogs run.\r\n  A man sleeps. \nHi.\n\n")  # BOM, CRLF, trailing blank
    tgt = write(tmp_path / "a.de", "Zwei Hunde rennen.\nEin Mann schläft.\nHallo.\n")
    expected = [Pair("Two dogs run.", "Zwei Hunde rennen.", 1), Pair("A man sleeps.", "Ein Mann schläft.", 2),
                Pair("Hi.", "Hallo.", 3)]
    assert read_parallel(src, tgt) == expected
    tsv = write(tmp_path / "a.tsv", "Two dogs run.\tZwei Hunde rennen.\nA man sleeps.\tEin Mann schläft.\nHi.\tHallo.\n")
    assert read_parallel(tsv) == expected


def test_bad_parallel_files_are_one_line(tmp_path):
    src = write(tmp_path / "s.en", "a\nb\nc\n")
    tgt = write(tmp_path / "t.de", "x\ny\n")
    assert error(src, tgt) == (f"{src} has 3 lines and {tgt} has 2; expected the same number "
                               "(line n of the target translates line n of the source)")
    tgt = write(tmp_path / "t.de", "x\n\nz\n")
    assert error(src, tgt) == (f"{src}:2 and {tgt}:2: an empty target sentence; expected a sentence on both sides")
    src2 = write(tmp_path / "s2.en", "a\n \nc\n")
    assert error(src2, tgt) == (f"{src2}:2 and {tgt}:2: an empty line pair; expected a sentence on both sides")
    assert error(tmp_path / "missing.en", tgt) == (
        f"{tmp_path / 'missing.en'}: no such file; expected one sentence per line, aligned line by line with the other side")
    empty = write(tmp_path / "e.de", "\n\n")
    assert error(src, empty) == f"{empty}: no sentences; expected one sentence per line, aligned line by line with the other side"
    bad = write(tmp_path / "b.de", b"x\ny\xff\nz\n")
    assert error(src, bad) == f"{bad}:2: bytes are not valid UTF-8 (column 2); expected UTF-8 text"

    shape = "one source<TAB>target pair per line"
    tsv = write(tmp_path / "a.tsv", "a\tx\nb\ty\tz\n")
    assert error(tsv) == f"{tsv}:2: 3 tab-separated columns; expected 2 ({shape})"
    tsv = write(tmp_path / "b.tsv", "a\tx\nb\n")
    assert error(tsv) == f"{tsv}:2: 1 tab-separated columns; expected 2 ({shape})"
    tsv = write(tmp_path / "c.tsv", "a\tx\n\nb\ty\n")
    assert error(tsv) == f"{tsv}:2: an empty line pair; expected a sentence on both sides ({shape})"
    tsv = write(tmp_path / "d.tsv", "a\tx\n \ty\n")
    assert error(tsv) == f"{tsv}:2: an empty source sentence; expected a sentence on both sides ({shape})"
    assert error(tmp_path) == f"{tmp_path}: not a file; expected parallel text, {shape}"


def test_keep_by_length_drops_long_and_lopsided_pairs():
    src = [5, 5, 30, 2, 10, 0]
    tgt = [6, 20, 5, 2, 31, 3]
    # pair 1: ratio 4 > 3; pair 2: ratio 6; pair 4: target over 30; pair 5: an empty side
    assert keep_by_length(src, tgt, max_length=30, max_ratio=3.0).tolist() == [0, 3]
    assert keep_by_length(src, tgt, max_length=30, max_ratio=0).tolist() == [0, 1, 2, 3]
    assert keep_by_length(src, tgt, max_length=1000, max_ratio=0).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.skipif(not (SHARED / "multi30k").is_dir(), reason="../shared/data/multi30k not present")
@pytest.mark.slow  # reads 29k + 18k real sentence pairs
def test_real_multi30k_and_en_zh():
    pairs = read_parallel(SHARED / "multi30k" / "train.en", SHARED / "multi30k" / "train.de")
    assert len(pairs) == 29000 and pairs[-1].line == 29000
    assert all(p.source and p.target and "\n" not in p.source + p.target for p in pairs)
    assert len(read_parallel(SHARED / "multi30k" / "val.en", SHARED / "multi30k" / "val.de")) == 1014
    zh = read_parallel(SHARED / "en-zh" / "train.tsv")
    assert len(zh) == 18133 and zh[0] == Pair("Hi.", "你好。", 1)
    lengths = np.array([[len(p.source.split()), len(p.target.split())] for p in pairs])
    kept = keep_by_length(lengths[:, 0], lengths[:, 1], max_length=50, max_ratio=3.0)
    assert 0.95 * len(pairs) < len(kept) < len(pairs)  # captions: a few lopsided pairs, most kept
