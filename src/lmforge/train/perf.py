"""Device facts for throughput reporting: peak FLOP/s (looked up for GPUs, measured once and cached
for CPUs) and whether a CPU computes bf16 natively."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

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
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


def _cached(key: str, measure) -> float:
    try:
        table = json.loads(CACHE.read_text())
    except (OSError, ValueError):
        table = {}
    if key not in table:
        table[key] = measure()
        try:
            CACHE.parent.mkdir(parents=True, exist_ok=True)
            CACHE.write_text(json.dumps(table, indent=1))
        except OSError:
            pass  # a read-only home only costs a re-measurement next time
    return table[key]


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of `device` for matmuls in `dtype`; None for an unknown GPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, single) in GPU_PEAK_TFLOPS.items():
            if key in name:
                return (single if dtype == torch.float32 else half) * 1e12
        return None
    key = f"{_cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}|{dtype}"
    return _cached(key, lambda: measure_matmul_flops(dtype))


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises bf16 instructions and a bf16 matmul actually beats fp32 (some
    virtual machines advertise the flags while emulating them slowly)."""
    if not _cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        return False
    fp32 = peak_flops(torch.device("cpu"), torch.float32)
    bf16 = peak_flops(torch.device("cpu"), torch.bfloat16)
    return bf16 > fp32
