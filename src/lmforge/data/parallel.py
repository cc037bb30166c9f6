"""Parallel text for translation: two line-aligned files (line n of the target translates line n of the
source) or one TSV of `source<TAB>target` lines. Every pair needs a sentence on both sides; a bad file is
one error naming the file and line. Pairs are then filtered by token length and length ratio, the usual
clean-up of noisy parallel data (over-long pairs and pairs whose sides cannot be translations)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.data.formats import decoded_lines
from lmforge.errors import UserError

TSV_SHAPE = "one source<TAB>target pair per line"


@dataclass(frozen=True)
class Pair:
    source: str
    target: str
    line: int  # 1-based, in the TSV or in both aligned files


def _lines(path: Path, what: str) -> list[str]:
    """The file's lines without line ends; blank lines at its end are dropped (an editor's trailing newline)."""
    if not path.is_file():
        raise UserError(f"{path}: {'no such file' if not path.exists() else 'not a file'}; expected {what}")
    lines = [line.rstrip("\r\n") for _, line in decoded_lines(path)]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise UserError(f"{path}: no sentences; expected {what}")
    return lines


def _empty_side(source: str, target: str) -> str | None:
    if not source and not target:
        return "an empty line pair"
    if not source:
        return "an empty source sentence"
    if not target:
        return "an empty target sentence"
    return None


def read_parallel(source: str | Path, target: str | Path | None = None) -> list[Pair]:
    """Sentence pairs from a TSV (target None) or from two aligned files, stripped of outer whitespace."""
    source = Path(source)
    if target is None:
        pairs = []
        for lineno, line in enumerate(_lines(source, f"parallel text, {TSV_SHAPE}"), 1):
            cols = line.split("\t") if line.strip() else ["", ""]
            if len(cols) != 2:
                raise UserError(f"{source}:{lineno}: {len(cols)} tab-separated columns; expected 2 ({TSV_SHAPE})")
            src, tgt = cols[0].strip(), cols[1].strip()
            if problem := _empty_side(src, tgt):
                raise UserError(f"{source}:{lineno}: {problem}; expected a sentence on both sides ({TSV_SHAPE})")
            pairs.append(Pair(src, tgt, lineno))
        return pairs
    target = Path(target)
    what = "one sentence per line, aligned line by line with the other side"
    src_lines, tgt_lines = _lines(source, what), _lines(target, what)
    if len(src_lines) != len(tgt_lines):
        raise UserError(f"{source} has {len(src_lines)} lines and {target} has {len(tgt_lines)}; expected the "
                        "same number (line n of the target translates line n of the source)")
    pairs = []
    for lineno, (src, tgt) in enumerate(zip(src_lines, tgt_lines), 1):
        src, tgt = src.strip(), tgt.strip()
        if problem := _empty_side(src, tgt):
            raise UserError(f"{source}:{lineno} and {target}:{lineno}: {problem}; expected a sentence on both sides")
        pairs.append(Pair(src, tgt, lineno))
    return pairs


def keep_by_length(source_lengths, target_lengths, max_length: int, max_ratio: float) -> np.ndarray:
    """Indices of the pairs whose sides are both at most max_length tokens and whose longer side is at
    most max_ratio times the shorter one (0 = no ratio limit)."""
    s, t = np.asarray(source_lengths, dtype=np.float64), np.asarray(target_lengths, dtype=np.float64)
    keep = (s <= max_length) & (t <= max_length) & (s > 0) & (t > 0)
    if max_ratio:
        keep &= np.maximum(s, t) <= max_ratio * np.minimum(s, t)
    return np.flatnonzero(keep)
