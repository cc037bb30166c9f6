"""A quantised frozen base for LoRA (QLoRA-style, `peft.base_dtype`): the frozen Linear weights of the
blocks held as int8 (per-row absmax, weight-only) or NF4 (4-bit NormalFloat, blocks of 64 with
double-quantised scales, Dettmers et al. 2023) through `torchao`, while the LoRA A and B, the embeddings,
the norms and the output head stay in the model's dtype (fp32), and so does the optimizer state.

What is quantised: every nn.Linear inside `model.blocks` (attention and MLP), whether a LoRA target or
not; they are all frozen under peft.method lora. The token embedding and the output head (tied or not: the
head feeds the chunked cross-entropy, which needs a plain weight) and every norm are left as they are.

The weight is a torchao tensor subclass held in the Linear's own `weight` Parameter (requires_grad False),
so state-dict names are unchanged. A layer computes through `linear`: one autograd Function that
dequantises the weight to the compute dtype (autocast's, else the input's) in the forward pass and again
in the backward pass, and keeps only the quantised weight for backward. (F.linear on a torchao int8 weight
would keep a dequantised fp32 copy of every layer's weight for the backward pass: a full-precision copy of
the base for the whole step.) A frozen Linear that is not a LoRA target becomes a `QuantLinear`.

torchao is imported only when a quantised base is asked for (`lmforge --help` and plain runs never import
it), with its start-up log lines about CUDA kernels that a CPU machine cannot load kept out of the output.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import UserError

MIN_TORCHAO = "0.15"  # the first release with torchao.quantization.Int8Tensor (pyproject's quant extra)
NF4_BLOCK = 64  # values per NF4 scale (the QLoRA paper's and torchao's block size)
NF4_SCALER_BLOCK = 256  # NF4 scales per double-quantised second-level scale, at most
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")  # torchao's import logs through these
_TYPES: tuple[type, ...] = ()  # the torchao weight classes, once torchao is imported: is_quantised's test
_NF4_RUNS: dict[str, bool] = {}  # device type -> whether an NF4 linear runs there (checked once)


@contextlib.contextmanager
def _quiet(names=QUIET_LOGGERS):
    """Those loggers at ERROR level inside the block, then as they were: torchao's import warns for each
    CUDA kernel library it cannot load ("Failed to load ..._C_cutlass_90a.abi3.so") and torch's pytree for
    an enum it registers (and Python, compiling it the first time, about escapes in its docstrings); none
    of it is about anything lmforge does."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", SyntaxWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _torchao(base_dtype: str):
    """The torchao pieces: (Int8Tensor, PerRow, NF4Tensor, to_nf4); a UserError naming the extra to
    install when torchao is missing."""
    global _TYPES
    if importlib.util.find_spec("torchao") is None:
        raise UserError(f"config: peft.base_dtype = {base_dtype} needs the torchao library; install it with "
                        "pip install 'lmforge[quant]' (or pip install torchao), or leave peft.base_dtype = none")
    with _quiet():
        import torchao

        try:
            from torchao.quantization import Int8Tensor
            from torchao.quantization.granularity import PerRow
        except ImportError:
            found = getattr(torchao, "__version__", "?")
            raise UserError(f"config: peft.base_dtype = {base_dtype} needs torchao {MIN_TORCHAO} or newer (its "
                            f"Int8Tensor); this is torchao {found}: pip install -U 'lmforge[quant]'") from None
        try:
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, to_nf4
        except ImportError:  # where torchao kept it before
            from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4
    _TYPES = (Int8Tensor, NF4Tensor)
    return Int8Tensor, PerRow, NF4Tensor, to_nf4


def is_quantised(t) -> bool:
    """Whether `t` is a quantised weight (False for everything while torchao has not been imported)."""
    return bool(_TYPES) and isinstance(t, _TYPES)


def kind(t) -> str:
    """int8, nf4, or none for a plain tensor."""
    if not is_quantised(t):
        return "none"
    return "int8" if isinstance(t, _TYPES[0]) else "nf4"


def _nf4_scaler_block(n_blocks: int) -> int:
    """The largest number <= NF4_SCALER_BLOCK of NF4 scales that divides `n_blocks` (torchao needs it whole)."""
    return max(d for d in range(1, min(NF4_SCALER_BLOCK, n_blocks) + 1) if n_blocks % d == 0)


def quantise(weight: torch.Tensor, base_dtype: str, name: str = "weight") -> torch.Tensor:
    """A [out, in] floating weight as a torchao int8 (per row) or NF4 tensor, on the weight's device."""
    Int8Tensor, PerRow, _, to_nf4 = _torchao(base_dtype)
    w = weight.detach()
    if base_dtype == "int8":
        return Int8Tensor.from_hp(w, PerRow())
    if base_dtype == "nf4":
        if w.numel() % NF4_BLOCK:
            raise UserError(f"config: peft.base_dtype = nf4: {name} has {w.numel()} values, not a multiple of "
                            f"NF4's block of {NF4_BLOCK}; use peft.base_dtype = int8")
        return to_nf4(w, NF4_BLOCK, _nf4_scaler_block(w.numel() // NF4_BLOCK))
    raise ValueError(f"quantise: base_dtype {base_dtype!r}: expected int8 or nf4")


def dequantise(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A quantised weight's values as a plain tensor (in `dtype`, default its own logical dtype); a plain
    tensor as it is (cast to dtype). Computed in fp32 and then cast, as torchao's own dequantisation, with
    the same values, but several times faster on a CPU (every forward and backward pass of a quantised layer
    dequantises its weight): int8 codes times their row's scale; NF4 through a 256-entry table that decodes
    both 4-bit codes of a byte at once, times their block's scale."""
    if not is_quantised(weight):
        return weight if dtype is None else weight.to(dtype)
    dtype = dtype or weight.dtype
    if kind(weight) == "int8":
        return _dequantise_int8(weight).to(dtype)
    return _dequantise_nf4(weight).to(dtype)


def _dequantise_int8(w) -> torch.Tensor:
    scale = w.scale
    if w.qdata.dim() != 2 or tuple(scale.shape) != (w.qdata.shape[0], 1):  # not per row: torchao's general path
        return w.dequantize(torch.float32)
    if w.zero_point is not None and bool(w.zero_point.any()):  # zero for the symmetric quantisation used here
        return (w.qdata.to(torch.float32) - w.zero_point.to(torch.float32)) * scale.to(torch.float32)
    return w.qdata * scale.to(torch.float32)  # one pass: int8 times fp32 is computed in fp32


def _dequantise_nf4(w) -> torch.Tensor:
    if not w.is_contiguous():  # a transposed view: torchao's own path
        return w.get_original_weight().to(torch.float32)
    codes = torch.arange(256, device=w.nf4.device)
    pairs = torch.stack([w.nf4[codes >> 4], w.nf4[codes & 0b1111]], dim=-1)  # byte -> (first, second) value
    values = pairs.index_select(0, w.quantized_data.to(torch.int32)).view(-1, w.block_size)
    scalers = w.dequantize_scalers(w.quantized_scalers, w.quantization_factor, w.scaler_block_size)
    return (values * scalers.unsqueeze(-1)).to(torch.float32).reshape(w.shape)


def storage_bytes(t: torch.Tensor) -> int:
    """The bytes a tensor really holds: a quantised one's inner tensors (codes and scales) together."""
    if not is_quantised(t):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    inner = [getattr(t, n) for n in names]
    return sum(x.numel() * x.element_size() for x in inner if isinstance(x, torch.Tensor))


# -- the linear layer --------------------------------------------------------------------------------------


class _Box:
    """Carries the quantised weight into the autograd Function as a plain object: passed as a tensor
    argument, its __torch_function__ would take over Function.apply."""

    __slots__ = ("weight",)

    def __init__(self, weight: torch.Tensor):
        self.weight = weight


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _QuantisedLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantised on the fly; W takes no gradient and only W itself (quantised) is
    kept for the backward pass, which dequantises it again for grad_x = grad_y W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, box: _Box) -> torch.Tensor:
        dtype = _compute_dtype(x)
        ctx.box, ctx.dtype, ctx.x_dtype = box, dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        with torch.autocast(x.device.type, enabled=False):
            w = dequantise(box.weight, dtype)
            return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            with torch.autocast(grad.device.type, enabled=False):
                grad_x = (grad.to(ctx.dtype) @ dequantise(ctx.box.weight, ctx.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, for a quantised weight too (see _QuantisedLinear)."""
    if not is_quantised(weight):
        return F.linear(x, weight, bias)
    return _QuantisedLinear.apply(x, bias, _Box(weight))


class QuantLinear(nn.Linear):
    """An nn.Linear whose frozen weight is quantised: the same `weight` and `bias` names, computed by
    `linear`. A LoRA target on a quantised base is a LoRALinear (peft.py), which computes the same way."""

    @classmethod
    def around(cls, layer: nn.Linear) -> QuantLinear:
        """A QuantLinear holding `layer`'s own weight and bias Parameters (no copy)."""
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
        new.weight, new.bias = layer.weight, layer.bias
        if hasattr(layer, "residual_out"):
            new.residual_out = layer.residual_out
        new.train(layer.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base_dtype={kind(self.weight)}"


# -- models ------------------------------------------------------------------------------------------------


def targets(model: nn.Module) -> list[str]:
    """The Linear layers a quantised base quantises: every one inside `model.blocks` (none of the
    embeddings, norms, output head or task head)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def as_quant_linears(model: nn.Module) -> None:
    """Every target Linear of `model` (a plain nn.Linear) as a QuantLinear around the same Parameters,
    before its weight is quantised (hf.load does this on a model built on the meta device)."""
    for name in targets(model):
        layer = model.get_submodule(name)
        if type(layer) is nn.Linear:
            _replace(model, name, QuantLinear.around(layer))


def set_quantised(layer: nn.Linear, weight: torch.Tensor, base_dtype: str, name: str = "weight") -> None:
    """`weight` (a plain floating tensor) quantised into `layer.weight`, frozen."""
    layer.weight = nn.Parameter(quantise(weight, base_dtype, name), requires_grad=False)


def quantise_model(model: nn.Module, base_dtype: str) -> nn.Module:
    """Quantise a loaded model's target Linears in place, one at a time (each layer's full-precision weight
    is freed as its quantised one replaces it); a no-op for base_dtype none and for those done already."""
    if base_dtype == "none":
        return model
    as_quant_linears(model)
    for name in targets(model):
        layer = model.get_submodule(name)
        if not is_quantised(layer.weight):
            set_quantised(layer, layer.weight, base_dtype, f"{name}.weight")
            release_freed()
    return model


def release_freed() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere). Quantising a
    weight frees its full-precision temporaries (the tensor read, q/k/v or gate/up joined, quantisation's
    intermediates) at once, but glibc keeps freed blocks of these sizes resident: the streamed int8 import of
    SmolLM2-135M ended at 550 MiB resident for 210 MiB of weights. Trimmed after each weight, it peaks at
    234 MiB: what the model holds plus one weight's temporaries."""
    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None  # libc's malloc_trim, once looked up (False where there is none)


def quantised_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_quantised(m.weight)}


def base_dtype_of(model: nn.Module) -> str:
    """int8, nf4 or none: how the model's quantised layers are held."""
    return next((kind(m.weight) for m in quantised_layers(model).values()), "none")


def dequantise_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Every quantised weight back to a plain Parameter of its dequantised values (for export: what the
    model computes, written as an ordinary model), each QuantLinear back to an nn.Linear. In place."""
    for name, layer in quantised_layers(model).items():
        layer.weight = nn.Parameter(dequantise(layer.weight, dtype), requires_grad=False)
        if type(layer) is QuantLinear:
            plain = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
            plain.weight, plain.bias = layer.weight, layer.bias
            if hasattr(layer, "residual_out"):
                plain.residual_out = layer.residual_out
            plain.train(layer.training)
            _replace(model, name, plain)
    return model


def to(model: nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> nn.Module:
    """model.to(device, dtype), with quantised weights moved but never cast (a cast dequantises an NF4
    tensor); the other floating parameters and buffers take `dtype`, in place, so tied weights stay tied."""
    if not quantised_layers(model):
        return model.to(device, dtype)
    for module in model.modules():
        for key, p in list(module.named_parameters(recurse=False)):
            if is_quantised(p):
                moved = p.to(device)
                if moved is not p:
                    setattr(module, key, nn.Parameter(moved, requires_grad=False))
            else:
                p.data = p.data.to(device, dtype if dtype is not None and p.is_floating_point() else None)
        for key, b in list(module.named_buffers(recurse=False)):
            setattr(module, key, b.to(device, dtype if dtype is not None and b.is_floating_point() else None))
    return model


# -- checks ------------------------------------------------------------------------------------------------


def nf4_runs(device: torch.device) -> bool:
    """Whether torchao's NF4 linear runs on `device` (a small forward and backward pass, once per device
    type): on CUDA and, with torchao's plain-torch kernels, on the CPU."""
    if device.type not in _NF4_RUNS:
        try:
            # fixed values, not the RNG's: the check must not move a run's random stream
            w = torch.linspace(-1, 1, NF4_BLOCK * NF4_BLOCK * 4, device=device).reshape(NF4_BLOCK, -1)
            x = torch.linspace(-1, 1, NF4_BLOCK * 8, device=device).reshape(2, -1).requires_grad_()
            linear(x, quantise(w, "nf4")).sum().backward()
            _NF4_RUNS[device.type] = bool(torch.isfinite(x.grad).all())
        except UserError:
            raise
        except Exception:  # any failure inside torchao means no kernel here
            _NF4_RUNS[device.type] = False
    return _NF4_RUNS[device.type]


def check(base_dtype: str, device: torch.device) -> None:
    """A UserError, before anything is written, where the base cannot be quantised on `device`: torchao
    missing, or no NF4 kernel that runs there."""
    if base_dtype == "none":
        return
    _torchao(base_dtype)
    if base_dtype == "nf4" and not nf4_runs(device):
        raise UserError(f"config: peft.base_dtype = nf4: no NF4 kernel runs on {device.type} here (torchao's NF4 "
                        "linear failed there); use peft.base_dtype = int8")
