"""Declaring config fields: a default, a one-line doc (shown by --help), choices and a value check."""

from __future__ import annotations

import re
from dataclasses import field
from typing import Any, Callable

Check = tuple[Callable[[Any], bool], str]


def gt(lo: float) -> Check:
    return (lambda v: v > lo, f"> {lo}")


def ge(lo: float) -> Check:
    return (lambda v: v >= lo, f">= {lo}")


def between(lo: float, hi: float) -> Check:
    return (lambda v: lo <= v <= hi, f"in [{lo}, {hi}]")


def fraction_open() -> Check:
    return (lambda v: 0 < v < 1, "in (0, 1)")


def fraction_upper() -> Check:
    return (lambda v: 0 < v <= 1, "in (0, 1]")


def nonempty() -> Check:
    return (lambda v: v != "", "a non-empty string")


def file_endings() -> Check:
    return (lambda v: bool(v) and all(e.startswith(".") and len(e) > 1 for e in v),
            "one or more file name endings with their dot, like .txt")


# torch.Generator.manual_seed takes a signed 64-bit seed on some versions and devices, an unsigned one on
# others; below 2**63 every one takes it, and seed + rank (train/loop.py) and seed + sample (generate
# --num-samples, tasks/clm.py) stay in range
SEED_MAX = 2**63 - 1


# Sampling settings that reach a generator: below these, logits / temperature overflow float32 into NaN
# probabilities and a nucleus mass is 0 in float32 (which drops even the most likely token); the CLI and the
# server take the same ranges
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0
MIN_TOP_P = 1e-6


def temperature_range() -> Check:
    return (lambda v: v == 0 or MIN_TEMPERATURE <= v <= MAX_TEMPERATURE,
            f"0 (greedy) or {MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g}")


def top_p_range() -> Check:
    return between(MIN_TOP_P, 1)


def seed_range() -> Check:
    return between(0, SEED_MAX)


def device_name() -> Check:
    return (lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None, "auto, cpu, mps, cuda or cuda:N")


def opt(default: Any, doc: str, *, choices: tuple | Callable[[], tuple] | None = None, check: Check | None = None):
    """A config field with its one-line doc, its allowed choices and a value check. `choices` may be a
    function, called when a value is checked: the task names come from a registry that can grow."""
    meta = {"doc": doc, "choices": choices, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, doc: str):
    return field(default_factory=cls, metadata={"doc": doc, "choices": None, "check": None})


def choices_of(f) -> tuple | None:
    """A field's allowed values (see opt), or None when any value of its type is allowed."""
    choices = f.metadata.get("choices")
    return choices() if callable(choices) else choices
