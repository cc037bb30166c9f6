"""Peak memory of a function on CPU, where torch keeps no allocator statistics: the process's
resident-set high-water mark (Linux VmHWM), reset just before the function runs.

The profiler's memory timeline was tried first and misses tensors allocated inside custom autograd
Functions, so it under-counts exactly what the chunked loss benchmark must see. Resident memory
counts every byte the process touches; what the allocator keeps cached counts too, as it would in
a real run.
"""

from __future__ import annotations

import gc
import re
from pathlib import Path
from typing import Callable


def _status_bytes(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def peak_bytes(fn: Callable[[], object]) -> tuple[int, int]:
    """(peak, end): the highest resident memory while `fn` runs and the resident memory after it,
    both above the resident memory just before it (Linux only)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - before, _status_bytes("VmRSS") - before
