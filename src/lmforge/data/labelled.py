"""Readers for labelled fine-tuning data, the label map, the dev split and the tagging scheme.

Formats (`finetune.format`; auto picks by extension, see `labelled_format`):

- sst: one example per non-empty line, `LABEL<space or tab>text` (SST-2). Prediction inputs
  (`require_labels=False`) cannot be told apart from labelled lines, so there the whole line is the text.
- csv / tsv: Python's csv module; tsv is tab-separated with no quoting at all (a `"` is an ordinary
  character, every line is one row). With `finetune.header` the first row names the columns, otherwise
  the fields are column numbers from 0 (negative counts from the end).
- jsonl: one JSON object per line, fields by name.
- conll: whitespace-separated columns, the word in column 0 and the tag in `finetune.tag_column`, a blank
  line between sentences, `-DOCSTART-` lines skipped.

Every problem a user can fix is a `UserError` of one line, `PATH:LINE: what is wrong; expected what`.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from lmforge import chat
from lmforge.data.formats import decoded_lines, json_problem
from lmforge.errors import UserError
from lmforge.io import atomic_text
from lmforge.tasks import registry

FORMATS = ("sst", "csv", "tsv", "jsonl", "conll")  # which of them a task reads: its registry entry's `formats`
SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".conll": "conll"}
FORMAT_SHAPES = {
    "sst": "one `LABEL text` per line",
    "csv": "comma-separated rows",
    "tsv": "tab-separated rows",
    "jsonl": "one JSON object per line",
    "conll": "one `word ... tag` line per word and a blank line between sentences",
}
# the JSON object a JSONL line holds, by label kind (field names at their defaults)
JSON_SHAPE = '{"text": ..., "label": ...}'
JSON_SHAPES = {"response": '{"prompt": ..., "response": ...}',
               "preference": '{"prompt": ... or "messages": [...], "chosen": ..., "rejected": ...}'}
SCHEME_PREFIXES = {"BIO": ("B", "I"), "IOBES": ("B", "I", "E", "S")}


@dataclass
class Example:
    text: str | list         # the sentence; for task "tag" the list of words; for "sft" the prompt, or the
    #                          conversation ({"role", "content"} dicts) of a `messages` line
    pair: str | None = None  # the second sentence of a pair (with finetune.pair_field); a preference prediction
    #                          input: the answer to score (reward), `text` being the prompt or the turns before it
    label: object = None     # by the task's label kind (tasks/registry.py): class: str; value: float; classes:
    #                          list[str]; tags: list[str]; response: str; preference: (chosen, rejected), the
    #                          prompt (text) then a string or the turns up to the answers; None when the file has no label
    line: int = 0            # 1-based line in the file (a CoNLL sentence: its first line; a csv record over
    #                          several lines, quoted line breaks in its values: the line of its label)


# ----------------------------------------------------------------------------------------------------------
# format and lines


def labelled_format(path: Path, fmt: str, task: str) -> str:
    """The format to read `path` with: `fmt` itself, or for auto the one its extension says (.csv, .tsv,
    .jsonl/.json, .conll; .txt and anything else: the task's first format, sst or conll). Raises UserError
    when the task cannot read that format (its registry entry's `formats`)."""
    readable = registry.spec(task).formats
    if not readable:
        raise ValueError(f"not a fine-tuning task: {task!r}")
    if fmt == "auto":
        by_suffix = SUFFIX_FORMATS.get(Path(path).suffix.lower())
        if readable == ("jsonl",) and by_suffix != "jsonl":  # a plain text file would fail at line 1 as bad JSON
            raise UserError(f"{path}: task {task} reads JSONL, one {JSON_SHAPES.get(_kind(task), JSON_SHAPE)} per "
                            "line; expected a .jsonl file (or finetune.format = jsonl)")
        fmt = by_suffix or readable[0]
    if fmt not in FORMATS:
        raise UserError(f"{path}: finetune.format = {fmt}; expected one of auto, {', '.join(FORMATS)}")
    if fmt not in readable:
        raise UserError(f"{path}: task {task} cannot read the {fmt} format; expected "
                        f"{' or '.join(readable)} (set finetune.format)")
    return fmt


def _check_file(path: Path, task: str, fmt: str) -> None:
    if not path.exists():
        raise UserError(f"{path}: no such file; expected the labelled {task} data ({FORMAT_SHAPES[fmt]})")
    if not path.is_file():
        raise UserError(f"{path}: not a file; expected the labelled {task} data ({FORMAT_SHAPES[fmt]})")


# ----------------------------------------------------------------------------------------------------------
# labels


def _kind(task: str) -> str:
    """The task's kind of label (tasks/registry.py LABEL_KINDS): what the readers parse and check."""
    return registry.spec(task).label


def _parse_label(value, task: str, fc, where: str):
    """A label as read from a text cell (sst, csv, tsv) or a JSON value (jsonl). `where` = "PATH:LINE"."""
    kind = _kind(task)
    if kind == "value":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UserError(f"{where}: label {value!r} is not a number; expected a number")
        try:
            x = float(value)
        except ValueError:
            raise UserError(f"{where}: label {value!r} is not a number; expected a number") from None
        if not math.isfinite(x):
            raise UserError(f"{where}: label {value!r} is not finite; expected a number")
        return x
    if kind == "classes":
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(fc.label_separator)] if value.strip() else []
        elif isinstance(value, list) and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
            parts = [str(v).strip() for v in value]
        else:
            raise UserError(f"{where}: labels {value!r} are {type(value).__name__}; expected a list of strings or "
                            f"a string with the labels separated by {fc.label_separator!r}")
        if any(not p for p in parts):
            raise UserError(f"{where}: an empty label in {value!r}; expected labels separated by "
                            f"{fc.label_separator!r}")
        return list(dict.fromkeys(parts))  # a label named twice counts once
    # a class
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(f"{where}: label {value!r} is {type(value).__name__}; expected a string (or an integer)")
    label = str(value).strip()
    if not label:
        raise UserError(f"{where}: empty label; expected a label")
    return label


def _text(value, what: str, where: str) -> str:
    """A text value; `what` names where it came from ("field 'text'", "column 'text'", "column 0")."""
    if not isinstance(value, str):
        raise UserError(f"{where}: {what} is {type(value).__name__}; expected a string")
    if not value.strip():
        raise UserError(f"{where}: empty text in {what}; expected a non-empty string")
    return value


# ----------------------------------------------------------------------------------------------------------
# readers


def _read_sst(path: Path, task: str, fc, require_labels: bool) -> Iterator[Example]:
    if fc.pair_field:
        raise UserError(f"{path}: finetune.pair_field = {fc.pair_field} but the sst format has one sentence per "
                        "line; expected a csv, tsv or jsonl file for sentence pairs")
    for lineno, line in decoded_lines(path):
        line = line.strip()
        if not line:
            continue
        if not require_labels:
            yield Example(line, line=lineno)
            continue
        parts = line.split(None, 1)
        if len(parts) < 2:
            raise UserError(f"{path}:{lineno}: no text after the label {parts[0]!r}; "
                            "expected LABEL<space>text")
        yield Example(parts[1].strip(), label=_parse_label(parts[0], task, fc, f"{path}:{lineno}"), line=lineno)


def _read_table(path: Path, fmt: str, task: str, fc, require_labels: bool) -> Iterator[Example]:
    current = [0]

    def source() -> Iterator[str]:  # remembers the line number of the last line the csv reader took
        for n, s in decoded_lines(path):
            current[0] = n
            yield s

    if fmt == "tsv":
        reader = csv.reader(source(), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(source())
    wanted = {"text": fc.text_field, "label": fc.label_field}
    if fc.pair_field:
        wanted["pair"] = fc.pair_field
    columns: dict[str, int | None] = {}
    width, width_from = None, ""

    def what(role: str) -> str:
        return f"column '{wanted[role]}'" if fc.header else f"column {columns[role]}"

    def rows() -> Iterator[tuple[int, list[str]]]:
        last = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise UserError(f"{path}:{current[0]}: {e}; expected {FORMAT_SHAPES[fmt]}") from None
            first = last + 1
            last = current[0]
            if any(c.strip() for c in row):
                yield first, row
            elif len(row) > 1:  # separators only (a blank or all-space line is skipped)
                raise UserError(f"{path}:{first}: a row with no values; expected {FORMAT_SHAPES[fmt]}")

    it = rows()
    if fc.header:
        try:
            head_line, head = next(it)
        except StopIteration:
            raise UserError(f"{path}: no examples; expected a header row and {FORMAT_SHAPES[fmt]}") from None
        head = [h.strip() for h in head]
        width, width_from = len(head), "the header"
        for role, name in wanted.items():
            if name in head:
                columns[role] = head.index(name)
            elif role == "label" and not require_labels:
                columns[role] = None
            else:
                setting = {"text": "text_field", "label": "label_field", "pair": "pair_field"}[role]
                raise UserError(f"{path}:{head_line}: no column '{name}' (the header has {', '.join(head)}); "
                                f"expected a column '{name}' or set finetune.{setting}")
    else:
        for role, name in wanted.items():
            try:
                columns[role] = int(name)
            except (TypeError, ValueError):
                setting = {"text": "text_field", "label": "label_field", "pair": "pair_field"}[role]
                raise UserError(f"{path}: finetune.{setting} = {name!r} is not a column number; expected an "
                                "integer from 0 because finetune.header is false") from None
    for first, row in it:
        if width is None:
            width, width_from = len(row), f"line {first}"
            for role, idx in list(columns.items()):
                if not -width <= idx < width:
                    if role == "label" and not require_labels:
                        columns[role] = None
                        continue
                    setting = {"text": "text_field", "label": "label_field", "pair": "pair_field"}[role]
                    raise UserError(f"{path}:{first}: no column {idx} for finetune.{setting} (the row has {width} "
                                    f"columns); expected a column number from 0 to {width - 1}")
        if len(row) != width:
            hint = "" if len(row) < width else " (a tab inside the text?)" if fmt == "tsv" else \
                " (quote a value that holds a comma)"
            raise UserError(f"{path}:{_field_line(first, row, -1)}: {len(row)} column{'s' if len(row) != 1 else ''}; "
                            f"expected {width} like {width_from}{hint}")
        text = _text(row[columns["text"]], what("text"), f"{path}:{_field_line(first, row, columns['text'])}")
        pair = (_text(row[columns["pair"]], what("pair"), f"{path}:{_field_line(first, row, columns['pair'])}")
                if "pair" in columns else None)
        label, line = None, first
        if columns["label"] is not None:
            line = _field_line(first, row, columns["label"])
            cell = row[columns["label"]]
            if cell.strip() or _kind(task) == "classes":  # an empty set of labels is a set
                label = _parse_label(cell, task, fc, f"{path}:{line}")
            elif require_labels:
                raise UserError(f"{path}:{line}: empty label in {what('label')}; expected "
                                f"{registry.LABEL_KINDS[_kind(task)]}")
        yield Example(text, pair=pair, label=label, line=line)


def _field_line(first: int, row: list[str], i: int) -> int:
    """The line field i of a csv record is on (negative i counts from the end): the record's first line plus
    the line breaks inside the values before it (a record spans lines only where a quoted value holds one)."""
    return first + sum(value.count("\n") for value in row[:i % len(row)])


def _read_jsonl(path: Path, task: str, fc, require_labels: bool) -> Iterator[Example]:
    kind = _kind(task)
    if kind == "response":
        text_name, label_name = fc.prompt_field, fc.response_field
    else:
        text_name, label_name = fc.text_field, fc.label_field
    for lineno, line in decoded_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({json_problem(e)}); "
                            "expected one JSON object per line") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: a JSON {type(record).__name__}; expected one JSON object per line")

        def field(name: str, setting: str):
            if name not in record:
                raise UserError(f"{where}: no field '{name}' (found: {', '.join(record) or 'none'}); "
                                f"expected a field '{name}' or set finetune.{setting}")
            return record[name]

        def strings(name: str, what: str, expected: str) -> list[str]:
            value = field(name, "text_field" if name == text_name else "label_field")
            value = value.split() if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
                raise UserError(f"{where}: field '{name}' is not a list of {what}; expected {expected}")
            return value

        if kind == "tags":
            words = strings(text_name, "words", "a list of non-empty strings (or one string of words separated "
                                                "by spaces)")
            if not words:
                raise UserError(f"{where}: no words in '{text_name}'; expected at least one word")
            tags = None
            if require_labels or label_name in record:
                tags = strings(label_name, "tags", "a list of strings, one tag per word")
                if len(tags) != len(words):
                    raise UserError(f"{where}: {len(words)} words but {len(tags)} tags; expected one tag per word")
                tags = [t.strip() for t in tags]
            yield Example(list(words), label=tags, line=lineno)
            continue

        if kind == "preference":
            yield _preference(record, fc, where, require_labels, lineno)
            continue
        if kind == "response" and "messages" in record:  # a conversation (chat SFT)
            yield _conversation(record["messages"], where, require_labels, lineno)
            continue
        text_setting = "prompt_field" if kind == "response" else "text_field"
        text = _text(field(text_name, text_setting), f"field '{text_name}'", where)
        pair = (_text(field(fc.pair_field, "pair_field"), f"field '{fc.pair_field}'", where)
                if fc.pair_field and kind != "response" else None)
        label = None
        if require_labels or label_name in record:
            value = field(label_name, "response_field" if kind == "response" else "label_field")
            if kind == "response":
                if not isinstance(value, str):
                    raise UserError(f"{where}: field '{label_name}' is {type(value).__name__}; expected a string")
                label = value
            elif value is None and not require_labels:
                label = None
            else:
                label = _parse_label(value, task, fc, where)
        yield Example(text, pair=pair, label=label, line=lineno)


def _conversation(messages, where: str, require_labels: bool, lineno: int) -> Example:
    """{"messages": [...]}: the turns as Example.text, the last assistant turn's content as the label (the
    reference answer of an evaluation); training data needs an assistant turn to learn from."""
    chat.check_messages(messages, where)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if require_labels and not answers:
        raise UserError(f"{where}: messages: no assistant turn; expected at least one answer to train on")
    return Example(messages, label=answers[-1] if answers and messages[-1]["role"] == "assistant" else None,
                   line=lineno)


def _preference(record: dict, fc, where: str, require_labels: bool, lineno: int) -> Example:
    """{"prompt": ... | "messages": [... ending with a user turn], "chosen": ..., "rejected": ...}: the prompt or
    the turns as Example.text, (chosen, rejected) as the label. An answer is a string or, as in TRL's
    conversational format, a list holding one assistant message. A prediction input (require_labels False)
    without chosen and rejected may carry one answer instead, as Example.pair: {"messages": [..., the
    assistant's answer]} or {"prompt": ..., "response": ...} (what a reward model scores)."""
    names = (fc.chosen_field, fc.rejected_field)
    unpaired = not require_labels and not any(n in record for n in names)
    if "messages" in record:
        turns = chat.check_messages(record["messages"], where)
        if turns[-1]["role"] == "assistant":
            if unpaired:
                return Example(*split_answer(turns, where), line=lineno)
            raise UserError(f"{where}: messages end with an assistant turn; expected the turns up to the question, "
                            f"the answers in '{fc.chosen_field}' and '{fc.rejected_field}'")
        text = turns
    elif fc.prompt_field in record:
        text = _text(record[fc.prompt_field], f"field '{fc.prompt_field}'", where)
    else:
        raise UserError(f"{where}: no field '{fc.prompt_field}' or 'messages' (found: {', '.join(record) or 'none'}); "
                        f"expected {JSON_SHAPES['preference']}")
    if unpaired:
        answer = _answer(record[fc.response_field], fc.response_field, where) if fc.response_field in record else None
        return Example(text, pair=answer, line=lineno)
    answers = []
    for name in names:
        if name not in record:
            raise UserError(f"{where}: no field '{name}' (found: {', '.join(record)}); expected "
                            f"{JSON_SHAPES['preference']} (or set finetune.{'chosen' if name == names[0] else 'rejected'}_field)")
        answers.append(_answer(record[name], name, where))
    if answers[0] == answers[1]:
        raise UserError(f"{where}: '{names[0]}' and '{names[1]}' are the same answer; expected two different answers")
    return Example(text, label=tuple(answers), line=lineno)


def split_answer(turns: list[dict], where: str) -> tuple[list[dict], str]:
    """A checked conversation that ends with the assistant's answer -> (the turns before it, the answer)."""
    if turns[-1]["role"] != "assistant":
        raise UserError(f"{where}: messages end with a {turns[-1]['role']} turn; expected the assistant's answer last")
    if len(turns) < 2:
        raise UserError(f"{where}: messages hold the assistant's answer alone; expected the turns it answers before it")
    return turns[:-1], _text(turns[-1]["content"], f"messages[{len(turns) - 1}].content", where)


def _answer(value, name: str, where: str) -> str:
    """An answer of a preference pair: a non-empty string, or [{"role": "assistant", "content": ...}]."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise UserError(f"{where}: field '{name}' is a list; expected a string or one assistant message "
                            '[{"role": "assistant", "content": ...}]')
        value = chat.check_messages(value, f"{where}: {name}")[0]["content"]
    return _text(value, f"field '{name}'", where)


def _read_conll(path: Path, task: str, fc, require_labels: bool) -> Iterator[Example]:
    tc = fc.tag_column
    if tc == 0:
        raise UserError(f"{path}: finetune.tag_column = 0 is the word column; expected the tag column "
                        "(-1 = the last)")
    need = tc + 1 if tc > 0 else 1 - tc  # columns a line needs to have the tag (the word is column 0)
    labelled: bool | None = None  # decided by the first word line when labels are optional
    words: list[str] = []
    tags: list[str] = []
    start = 0

    def sentence() -> Example:
        return Example(list(words), label=list(tags) if labelled else None, line=start)

    for lineno, line in decoded_lines(path):
        cols = line.split()
        if not cols:
            if words:
                yield sentence()
                words, tags = [], []
            continue
        if cols[0] == "-DOCSTART-":
            continue
        if labelled is None:
            labelled = require_labels or len(cols) > 1
        if labelled and len(cols) < need:
            raise UserError(f"{path}:{lineno}: {len(cols)} column{'s' if len(cols) != 1 else ''}, no tag column "
                            f"{tc}; expected at least {need} whitespace-separated columns, the word first "
                            "(set finetune.tag_column)")
        if not words:
            start = lineno
        words.append(cols[0])
        if labelled:
            tags.append(cols[tc])
    if words:
        yield sentence()


def read_examples(path: str | Path, task: str, fc, require_labels: bool = True) -> list[Example]:
    """Every example of a labelled file. `fc` is the FinetuneConfig; `require_labels=False` reads prediction
    inputs, where the label may be absent (Example.label None). Raises UserError for anything wrong."""
    path = Path(path)
    fmt = labelled_format(path, fc.format, task)
    _check_file(path, task, fmt)
    if fmt == "sst":
        found = _read_sst(path, task, fc, require_labels)
    elif fmt in ("csv", "tsv"):
        found = _read_table(path, fmt, task, fc, require_labels)
    elif fmt == "jsonl":
        found = _read_jsonl(path, task, fc, require_labels)
    else:
        found = _read_conll(path, task, fc, require_labels)
    examples = list(found)
    if not examples:
        raise UserError(f"{path}: no examples; expected {FORMAT_SHAPES[fmt]}"
                        + (" after the header row" if fmt in ("csv", "tsv") and fc.header else ""))
    return examples


def split_dev(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random split into (train, dev), each in file order; dev holds round(fraction * n) examples,
    at least one, and train keeps at least one."""
    n = len(examples)
    if n < 2:
        raise UserError(f"only {n} example{'s' if n != 1 else ''} in the training file; expected at least 2 to "
                        "hold out a dev split (or set finetune.dev)")
    n_dev = min(n - 1, max(1, round(fraction * n)))
    dev = set(random.Random(seed).sample(range(n), n_dev))
    return [e for i, e in enumerate(examples) if i not in dev], [e for i, e in enumerate(examples) if i in dev]


# ----------------------------------------------------------------------------------------------------------
# label map and tagging scheme


def _tag_problem(tag: str, scheme: str) -> str | None:
    if tag == "O":
        return None
    prefix, dash, kind = tag.partition("-")
    if not dash or not kind or prefix not in SCHEME_PREFIXES[scheme]:
        return (f"tag {tag!r} is not O or PREFIX-TYPE with a prefix in {', '.join(SCHEME_PREFIXES[scheme])}; "
                f"expected {scheme} tags like B-PER, I-PER, O")
    return None


def tag_scheme(tags: Iterable[str]) -> str:
    """"IOBES" when any tag starts with S- or E-, else "BIO"; raises UserError naming a tag that is not O or
    PREFIX-TYPE with a prefix of that scheme."""
    tags = list(tags)
    scheme = "IOBES" if any(t.startswith(("S-", "E-")) for t in tags) else "BIO"
    for t in tags:
        problem = _tag_problem(t, scheme)
        if problem:
            raise UserError(problem)
    return scheme


def _label_list(label, task: str) -> list:
    return list(label) if _kind(task) in ("classes", "tags") else [label]


class LabelMap:
    """The label set in a fixed order: label <-> index. For task tag also the tagging scheme."""

    def __init__(self, labels: list[str], task: str = "classify", scheme: str | None = None,
                 source: str = "the training data"):
        self.labels = list(labels)
        self.task = task
        self.scheme = scheme
        self.source = source  # where the labels came from, for error messages
        self._index = {label: i for i, label in enumerate(self.labels)}

    def __len__(self) -> int:
        return len(self.labels)

    def __eq__(self, other) -> bool:
        return isinstance(other, LabelMap) and (self.labels, self.task, self.scheme) == (
            other.labels, other.task, other.scheme)

    def __repr__(self) -> str:
        return f"LabelMap({self.labels!r}, task={self.task!r}, scheme={self.scheme!r})"

    @classmethod
    def build(cls, examples: list[Example], task: str, given: list | None = None,
              path: str | Path | None = None) -> LabelMap:
        """The sorted unique labels of `examples` (tag: the tags, multilabel: all labels), or `given` in its
        order, in which case an example with a label outside it is an error. `path` names the file in errors."""
        if _kind(task) not in ("class", "classes", "tags"):
            raise ValueError(f"task {task} has no label map")
        where = str(path) if path is not None else "training data"
        noun = "tag" if _kind(task) == "tags" else "label"
        seen: dict[str, Example] = {}
        for ex in examples:
            if ex.label is None:
                continue
            for label in _label_list(ex.label, task):
                seen.setdefault(label, ex)
        if given is not None:
            labels = [str(g) for g in given]
            dupes = sorted({g for g in labels if labels.count(g) > 1})
            if dupes:
                raise UserError(f"finetune.labels: {dupes[0]!r} appears more than once; expected each label once")
            if not labels:
                raise UserError("finetune.labels is empty; expected the label set (or leave it unset)")
            source = "finetune.labels"
            for label, ex in seen.items():
                if label not in labels:
                    raise UserError(f"{where}:{ex.line}: unknown {noun} {label!r}; {source} has {', '.join(labels)}")
        else:
            labels, source = sorted(seen), "the training data"
            if not labels:
                raise UserError(f"{where}: no labels; expected labelled examples")
            if _kind(task) == "class" and len(labels) < 2:
                raise UserError(f"{where}: every example has the label {labels[0]!r}; expected at least two "
                                "different labels")
        scheme = None
        if _kind(task) == "tags":
            scheme = "IOBES" if any(t.startswith(("S-", "E-")) for t in labels) else "BIO"
            for label in labels:
                problem = _tag_problem(label, scheme)
                if problem:
                    ex = seen.get(label)
                    raise UserError(f"{where}:{ex.line}: {problem}" if ex else f"finetune.labels: {problem}")
        return cls(labels, task, scheme, source)

    def index(self, label: str, example: Example | None = None, path: str | Path | None = None) -> int:
        """The index of one label (or tag); UserError at the example's file:line when it is unknown."""
        i = self._index.get(label)
        if i is None:
            where = f"{path if path is not None else 'data'}:{example.line if example is not None else 0}"
            noun = "tag" if _kind(self.task) == "tags" else "label"
            raise UserError(f"{where}: unknown {noun} {label!r}; {self.source} has {', '.join(self.labels)}")
        return i

    def encode(self, example: Example, path: str | Path | None = None) -> int | list[int]:
        """classify: the label's index; multilabel and tag: the list of indices."""
        if _kind(self.task) in ("classes", "tags"):
            return [self.index(label, example, path) for label in example.label]
        return self.index(example.label, example, path)

    def save(self, path: str | Path) -> None:
        data = {"labels": self.labels, "task": self.task}
        if self.scheme:
            data["scheme"] = self.scheme
        atomic_text(Path(path), json.dumps(data, ensure_ascii=False, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LabelMap:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such file; expected the labels.json written beside the fine-tuned model")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e}); expected {{\"labels\": [...]}}") from None
        labels = data.get("labels") if isinstance(data, dict) else None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise UserError(f"{path}: no list of strings under 'labels'; expected {{\"labels\": [...]}}")
        return cls(labels, data.get("task", "classify"), data.get("scheme"), f"{path}")
