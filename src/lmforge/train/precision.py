"""The number formats a run computes in, by device: the autocast dtype, loss scaling for fp16, TF32.

`train.precision`:
- auto: on CUDA, bf16 autocast where the GPU computes bf16 natively (Ampere and newer), else fp16
  autocast with loss scaling; on a CPU, bf16 autocast where it has native bf16 and a short timing
  confirms that a training step gains from it (`perf.cpu_auto_precision`), else fp32; fp32 elsewhere;
- fp32; bf16 (warned on a CPU that only emulates it); fp16 (CUDA only: its 5-bit exponent needs the
  loss scaled so small gradients do not flush to zero, `torch.amp.GradScaler`, whose state travels
  in the checkpoint so a resumed run scales as the uninterrupted one would).

Weights, gradients and optimizer state stay fp32 in every mode; autocast runs matmuls in the low
precision and keeps reductions and the loss's softmax in fp32.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

from lmforge.errors import UserError
from lmforge.train.perf import cpu_auto_precision, cpu_has_native_bf16

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16: what the configured value means on this device
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def autocast(self):
        """A fresh context for one forward pass (autocast contexts are not reusable across threads)."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device.type) if self.name == "fp16" else None


def cuda_has_bf16(device: torch.device) -> bool:
    """Native bf16 on this GPU; torch's own check counts slow emulation on older GPUs as support."""
    with torch.cuda.device(device):
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.4 has no such argument and counts native support only
            return torch.cuda.is_bf16_supported()


def resolve_precision(name: str, device: torch.device, parallel: str = "none",
                      where: str = "config: train.precision") -> Precision:
    """`train.precision` on `device` -> a Precision, or a one-line UserError for a format the device
    cannot run."""
    if name not in ("auto", *DTYPES):
        raise UserError(f"{where} = {name!r}: expected one of auto, {', '.join(DTYPES)}")
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if cuda_has_bf16(device) else "fp16"
        else:
            name = cpu_auto_precision() if device.type == "cpu" else "fp32"
    elif name == "fp16" and device.type != "cuda":
        raise UserError(f"{where} = fp16 on {device.type}: fp16 with loss scaling runs on CUDA only; "
                        "use auto, bf16 or fp32")
    elif name == "bf16" and device.type == "cuda" and not cuda_has_bf16(device):
        raise UserError(f"{where} = bf16: {torch.cuda.get_device_name(device)} has no native bf16; "
                        "use auto (fp16 with loss scaling here), fp16 or fp32")
    elif name == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("train.precision = bf16 on a CPU without fast native bf16: expect it to be many times "
                      "slower than fp32 (train.precision = fp32)", stacklevel=2)
    if name == "fp16" and parallel == "fsdp":
        raise UserError(f"{where} = fp16 with train.parallel = fsdp: loss scaling of sharded gradients is not "
                        "supported; use bf16 (or ddp)")
    return Precision(name, device)


def set_tf32(device: torch.device, on: bool) -> None:
    """Let fp32 matmuls and convolutions on CUDA use TF32 tensor cores (a 10-bit mantissa, several
    times the fp32 rate; what autocast leaves in fp32 gains from it). Only CUDA's switch: the
    process-wide `torch.set_float32_matmul_precision` would also change CPU matmuls."""
    if device.type != "cuda":
        return
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        torch.backends.cuda.matmul.fp32_precision = "tf32" if on else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if on else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
