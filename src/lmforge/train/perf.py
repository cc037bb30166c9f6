"""Device facts, measured per CPU model, thread count and torch version and cached for a day: peak FLOP/s
for throughput reporting (looked up for GPUs), whether a CPU computes bf16 natively, and whether a
training step gains from bf16 autocast on it (what `train.precision auto` picks on a CPU)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from lmforge.io import atomic_write

# Dense peak TFLOP/s from the vendors' data sheets: (bf16/fp16 tensor cores, fp32 without TF32).
GPU_PEAK_TFLOPS = {
    "H200": (989.0, 67.0), "H100 SXM": (989.0, 67.0), "H100 PCIe": (756.0, 51.0), "H100": (989.0, 67.0),
    "A100": (312.0, 19.5), "A10G": (125.0, 31.2), "L40S": (362.0, 91.6), "L4": (121.0, 30.3),
    "RTX 4090": (165.2, 82.6), "RTX 3090": (71.0, 35.6), "V100": (125.0, 15.7), "T4": (65.0, 8.1),
}
CACHE = Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge")) / "peak_flops.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def measure_matmul_flops(dtype: torch.dtype = torch.float32, sizes: tuple[int, ...] = (1024, 2048),
                         repeats: int = 5) -> float:
    """The best FLOP/s of square matmuls on the CPU with the current thread count (best over sizes and
    repeats, so a noisy neighbour lowers it less and MFU is not flattered)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype, device="cpu"), torch.randn(n, n, dtype=dtype, device="cpu")
        a @ b
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


def cache_key(what: str, threads: int | None = None) -> str:
    """The cache's key for a measurement on this CPU: its model, the intra-op threads, torch's version."""
    threads = torch.get_num_threads() if threads is None else threads
    return f"{_cpu_name()}|threads={threads}|torch={torch.__version__}|{what}"


# A measurement is taken again once it is this old (seconds): one taken while the machine was busy (a
# peak too low, which made MFU read above 1) does not stay wrong for good.
MAX_AGE = 24 * 3600


def cache_entry(value: float, measured: float | None = None) -> dict:
    """A cache entry: the value and when it was measured (time.time(); now where not given)."""
    return {"value": value, "measured": time.time() if measured is None else measured}


def _current(entry) -> bool:
    """An entry measured less than MAX_AGE ago; not a bare number (what lmforge cached before entries were dated)."""
    if not isinstance(entry, dict):
        return False
    value, measured = entry.get("value"), entry.get("measured")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, measured))
    return numbers and 0 <= time.time() - measured <= MAX_AGE


def _cached(key: str, measure, fresh: bool = False) -> float:
    """The cached measurement under `key`; measured (and cached) where there is none, where it is not current,
    or where `fresh` asks."""
    try:
        table = json.loads(CACHE.read_text())
    except (OSError, ValueError):
        table = {}
    if not isinstance(table, dict):
        table = {}
    if fresh or not _current(table.get(key)):
        table[key] = cache_entry(measure())
        try:
            CACHE.parent.mkdir(parents=True, exist_ok=True)
            # atomically: several processes (torchrun's ranks) may measure and write at once
            atomic_write(CACHE, lambda tmp: tmp.write_text(json.dumps(table, indent=1)))
        except OSError:
            pass  # a read-only home only costs a re-measurement next time
    return table[key]["value"]


def peak_flops(device: torch.device, dtype: torch.dtype, fresh: bool = False) -> float | None:
    """Peak FLOP/s of `device` for matmuls in `dtype`; None for an unknown GPU. A CPU's is measured with the
    current thread count (part of the cache's key) and cached; `fresh` measures it again whatever the cache
    holds. A GPU's is its data sheet's."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, single) in GPU_PEAK_TFLOPS.items():
            if key in name:
                return (single if dtype == torch.float32 else half) * 1e12
        return None
    if device.type != "cpu":  # mps: no data sheet here, and the CPU's peak is not its peak
        return None
    return _cached(cache_key(str(dtype)), lambda: measure_matmul_flops(dtype), fresh)


BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # /proc/cpuinfo's names for native bf16 instructions


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises bf16 instructions and a bf16 matmul actually beats fp32 (some
    virtual machines advertise the flags while emulating them slowly)."""
    if not _cpu_flags() & BF16_FLAGS:
        return False
    fp32 = peak_flops(torch.device("cpu"), torch.float32)
    bf16 = peak_flops(torch.device("cpu"), torch.bfloat16)
    return bf16 > fp32


# A bf16 training step must be at least this much faster than fp32 for `auto` to pick it: below,
# the gain is within the noise of a shared machine and not worth bf16's rounding.
BF16_MIN_GAIN = 1.15


def measure_bf16_step_gain(width: int = 384, rows: int = 2048, repeats: int = 5) -> float:
    """fp32 time / bf16-autocast time of a Transformer MLP sublayer's forward and backward pass (norm,
    two matmuls, GELU, residual: the bulk of a block's work, with the elementwise ops that autocast
    converts around each matmul), interleaved, medians. Takes about a second."""
    cpu = torch.device("cpu")
    g = torch.Generator(device=cpu).manual_seed(0)
    w1 = (torch.randn(4 * width, width, generator=g, device=cpu) * width ** -0.5).requires_grad_()
    w2 = (torch.randn(width, 4 * width, generator=g, device=cpu) * (4 * width) ** -0.5).requires_grad_()
    x = torch.randn(rows, width, generator=g, device=cpu, requires_grad=True)

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            h = torch.nn.functional.layer_norm(x, (width,))
            y = x + torch.nn.functional.gelu(h @ w1.t()) @ w2.t()
        y.float().square().mean().backward()
        return time.perf_counter() - start

    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(repeats + 1):
        for bf16 in (False, True):
            elapsed = step(bf16)
            if i:  # the first round warms up oneDNN's kernels
                times[bf16].append(elapsed)
    return statistics.median(times[False]) / statistics.median(times[True])


def cpu_auto_precision() -> str:
    """bf16 where the CPU has native bf16 instructions and a short timing shows a training step's work
    at least BF16_MIN_GAIN times faster under bf16 autocast; fp32 elsewhere (and on CPUs that
    advertise the flags but emulate them). Cached per CPU model, thread count and torch version."""
    if not _cpu_flags() & BF16_FLAGS:
        return "fp32"
    return "bf16" if _cached(cache_key("bf16_step_gain"), measure_bf16_step_gain) >= BF16_MIN_GAIN else "fp32"
