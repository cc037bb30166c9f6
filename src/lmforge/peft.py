"""Parameter-efficient fine-tuning: LoRA, bottleneck adapters, prefix tuning, and freezing embeddings or
the bottom layers. Plain functions on any `Transformer` (GPT, MaskedLM, the fine-tuning models).

The work is split in two so that a model rebuilt for inference gets the same structure as the trained
one without touching requires_grad:
  inject_peft(model, pc)     adds the method's modules (deterministic init from the torch RNG);
  set_trainable(model, pc)   freezes what the method and the freezing options say;
  apply_peft(model, pc)      both.

Names of what is injected (state dicts are saved and loaded by name, so they are fixed):
  lora     a target Linear `blocks.0.attn.qkv` becomes a LoRALinear that keeps `.weight` and `.bias` (the
           base keys of a state dict are unchanged) and adds `.lora_A` [r, in] and `.lora_B` [out, r]
  adapter  `blocks.{i}.attn_adapter.{down,up}.{weight,bias}` and `blocks.{i}.mlp_adapter.{...}`
  prefix   `blocks.{i}.attn.prefix` [2 (keys, values), n_kv_head, prefix_length, head_dim]

`strip_peft` and `base_state_dict` give the plain base model; hf/export.py writes a LoRA model as the
Hugging Face `peft` library's adapter folder for it. This module knows no file format but its own
adapter file (save_adapter / load_adapter).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lmforge.errors import UserError, one_line
from lmforge.io import atomic_write, write_safetensors
from lmforge.model.layers import Attention
from lmforge.quant import QuantLinear, dequantise, is_quantised, linear

# The task heads a fine-tuning model trains in full beside the peft parameters (apply_peft's default).
TASK_HEADS = ("classifier", "pooler")
EMBEDDINGS = ("tok_emb", "pos_emb", "seg_emb", "emb_norm")
PREFIX_STD = 0.02


# -- LoRA (Hu et al. 2021) --------------------------------------------------------------------------


class LoRALinear(nn.Linear):
    """y = x W^T + b + scale * dropout(x) A^T B^T, with A [r, in] and B [out, r], scale = alpha / r.

    A subclass of nn.Linear, so `weight` and `bias` keep their names and code that looks for Linear
    layers (init, FLOP counts) still finds it. B starts at zero: the model starts unchanged. The base
    weight may be quantised (peft.base_dtype, quant.py): it is then computed through quant.linear, and
    merging puts its dequantised values plus the update in its place until unmerge puts it back."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        # the init of the LoRA paper's code and of HF peft: A like nn.Linear's default, B zero
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False  # True while B @ A * scale is folded into weight (forward then adds nothing)
        self.disabled = False  # True inside peft_disabled(): the base layer alone

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float) -> LoRALinear:
        """A LoRALinear around `linear`'s own weight and bias Parameters (no copy: a pretrained weight
        loaded before or after stays the one the layer uses), A and B on its device and dtype."""
        w = linear.weight
        # the base weight is built on the meta device only to be replaced: no allocation, no RNG draw
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, rank, alpha, 0.0, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        new.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=w.device, dtype=w.dtype))
        new.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(new.lora_A, a=math.sqrt(5))
        new.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if hasattr(linear, "residual_out"):  # Transformer._init's depth-scaled init mark
            new.residual_out = linear.residual_out
        new.train(linear.training)
        return new

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        if self.merged or self.disabled:
            return y
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into weight (inference at the base model's cost). A quantised base weight is
        kept aside and replaced by its dequantised values plus the update (for export)."""
        if self.merged:
            return
        if is_quantised(self.weight):
            self.__dict__["quantised_base"] = self.weight  # not a registered Parameter: no state-dict entry
            merged = dequantise(self.weight, self.lora_A.dtype) + self.delta_weight()
            self.weight = nn.Parameter(merged, requires_grad=False)
        else:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of weight (equal to the base weight up to float rounding; a quantised
        base weight exactly: the one kept aside comes back)."""
        if not self.merged:
            return
        base = self.__dict__.pop("quantised_base", None)
        if base is not None:
            self.weight = base
        else:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
        self.merged = False

    def base_weight(self) -> torch.Tensor:
        """The base weight, merged or not (quantised where the base is)."""
        if not self.merged:
            return self.weight
        base = self.__dict__.get("quantised_base")
        return base if base is not None else (self.weight - self.delta_weight().to(self.weight.dtype)).detach()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where model.get_submodule(name) was (the parent keeps the child's place and name)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _matches(name: str, patterns) -> bool:
    # fnmatch's * needs at least the dot in "*.head": matching ".head" too lets "*." stand for no prefix
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase("." + name, p) for p in patterns)


def lora_targets(model: nn.Module, patterns) -> list[str]:
    """Names of the Linear layers the fnmatch patterns select (other module kinds are skipped)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n and _matches(n, patterns)]


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _inject_lora(model: nn.Module, pc) -> None:
    targets = lora_targets(model, pc.lora_targets)
    if not targets:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise UserError(f"peft.lora_targets = {list(pc.lora_targets)} match no linear layer of the model "
                        f"(it has {', '.join(linears[:4])}{', ...' if len(linears) > 4 else ''})")
    shared = _shared_weights(model)
    for name in targets:
        linear = model.get_submodule(name)
        if isinstance(linear, LoRALinear):  # injected already (inject_peft is idempotent)
            continue
        tied = shared[id(linear.weight)]
        if len(tied) > 1:  # merging would change the embedding too
            others = [t for t in tied if t != f"{name}.weight"]
            raise UserError(f"peft.lora_targets: {name} shares its weight with {others[0]} (tie_embeddings); "
                            f"leave it out of the targets")
        _replace(model, name, LoRALinear.from_linear(linear, pc.lora_rank, pc.lora_alpha, pc.lora_dropout))


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight (an exported or served model then runs at base cost)."""
    for m in lora_layers(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.unmerge()


# -- bottleneck adapters (Houlsby et al. 2019) ------------------------------------------------------


class Adapter(nn.Module):
    """x + up(gelu(down(x))) on a sublayer's output; `up` starts at zero, so the model starts unchanged."""

    def __init__(self, d_model: int, size: int, std: float, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(d_model, size, device=device, dtype=dtype)
        self.up = nn.Linear(size, d_model, device=device, dtype=dtype)
        self.act = nn.GELU()
        nn.init.normal_(self.down.weight, std=std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.disabled = False  # True inside peft_disabled(): the sublayer's output passes unchanged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))

    def hook(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        # a forward hook on block.attn / block.mlp rather than a wrapper module, so that the base names
        # (blocks.0.attn.qkv, ...) stay as they are; a bound method survives copy.deepcopy and pickling
        return output if self.disabled else self(output)


ADAPTER_SITES = (("attn", "attn_adapter"), ("mlp", "mlp_adapter"))


def _inject_adapters(model: nn.Module, pc) -> None:
    w = model.tok_emb.weight
    for block in model.blocks:
        for site, name in ADAPTER_SITES:
            if hasattr(block, name):  # injected already
                continue
            adapter = Adapter(model.cfg.d_model, pc.adapter_size, model.cfg.init_std, w.device, w.dtype)
            setattr(block, name, adapter)
            getattr(block, site).register_forward_hook(adapter.hook)


def _remove_adapters(model: nn.Module) -> None:
    for block in model.blocks:
        for site, name in ADAPTER_SITES:
            hooks = getattr(block, site)._forward_hooks
            for key in [k for k, h in hooks.items() if isinstance(getattr(h, "__self__", None), Adapter)]:
                del hooks[key]
            if hasattr(block, name):
                delattr(block, name)


# -- prefix tuning (Li & Liang 2021) ----------------------------------------------------------------


class PrefixAttention(Attention):
    """Attention whose queries also see a learned prefix: keys and values `prefix` [2 (keys, values),
    n_kv_head, P, head_dim], put before the sequence's own after RoPE and the KV cache, so they have no
    position and are never cached."""

    @classmethod
    def around(cls, attn: Attention, length: int) -> PrefixAttention:
        """`attn` with a prefix of `length` positions; its layers (LoRA'd or not) are the same objects."""
        new = _as_class(attn, cls)
        w = attn.qkv.weight
        new.prefix = nn.Parameter(torch.empty(2, attn.n_kv_head, length, attn.head_dim, device=w.device,
                                              dtype=w.dtype).normal_(std=PREFIX_STD))
        new.disabled = False  # True inside peft_disabled(): no prefix
        return new

    @property
    def extra_keys(self) -> int:
        return 0 if self.disabled else self.prefix.shape[2]

    def extend_keys(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
        """P leading True columns on the mask: every query may attend to every prefix position."""
        if self.disabled:
            return k, v, mask
        prefix = self.prefix.to(k.dtype)  # under autocast k is bf16 while the parameter stays fp32
        B, P = k.shape[0], prefix.shape[2]
        k = torch.cat([prefix[0].expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([prefix[1].expand(B, -1, -1, -1), v], dim=2)
        if mask is not None:
            mask = torch.cat([mask.new_ones(*mask.shape[:-1], P), mask], dim=-1)
        return k, v, mask

    def plain(self) -> Attention:
        """The same layer without its prefix."""
        return _as_class(self, Attention)


def _as_class(layer: Attention, cls: type) -> Attention:
    """`layer` as another Attention class, without running its __init__ (which would draw new weights):
    the settings (head counts, causal, dropout) and the child modules, the same objects, carried over."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, value in vars(layer).items():
        if not name.startswith("_") and name != "training":
            setattr(new, name, value)
    for name, child in layer.named_children():
        setattr(new, name, child)
    new.train(layer.training)
    return new


def _inject_prefix(model: nn.Module, pc) -> None:
    for name, m in list(model.named_modules()):
        if type(m) is Attention:  # once: a PrefixAttention already has its prefix
            _replace(model, name, PrefixAttention.around(m, pc.prefix_length))


# -- structure and trainability ---------------------------------------------------------------------


def inject_peft(model: nn.Module, pc) -> None:
    """Add the modules of pc.method (none, lora, adapter, prefix) to `model` in place; requires_grad is
    left alone. Idempotent, and base parameter names are unchanged, so it may run before or after base
    weights are loaded, and a saved peft model's state dict loads strictly into a fresh one after it."""
    if pc.method == "lora":
        _inject_lora(model, pc)
    elif pc.method == "adapter":
        _inject_adapters(model, pc)
    elif pc.method == "prefix":
        _inject_prefix(model, pc)
    elif pc.method != "none":
        raise UserError(f"peft.method = {pc.method}: expected none, lora, adapter or prefix")


@contextlib.contextmanager
def peft_disabled(model: nn.Module):
    """The base model inside the block: every LoRA update, adapter and prefix skipped. A preference loss's
    reference for a PEFT run is the same weights with the PEFT modules off, so no second copy is held."""
    switched = [m for m in model.modules() if isinstance(m, (LoRALinear, Adapter, PrefixAttention))]
    if any(getattr(m, "merged", False) for m in switched):
        raise RuntimeError("peft_disabled: a LoRA update is merged into its weight; unmerge_lora first")
    for m in switched:
        m.disabled = True
    try:
        yield model
    finally:
        for m in switched:
            m.disabled = False


def peft_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters inject_peft added (found by module type, not by name pattern)."""
    names = []
    for name, m in model.named_modules():
        pre = f"{name}." if name else ""
        if isinstance(m, LoRALinear):
            names += [pre + "lora_A", pre + "lora_B"]
        elif isinstance(m, Adapter):
            names += [pre + n for n, _ in m.named_parameters()]
        elif isinstance(m, PrefixAttention):
            names.append(pre + "prefix")
    return names


def peft_method(model: nn.Module) -> str:
    """The method whose modules the model holds: lora, adapter, prefix or none."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            return "lora"
        if isinstance(m, Adapter):
            return "adapter"
        if isinstance(m, PrefixAttention):
            return "prefix"
    return "none"


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def set_trainable(model: nn.Module, pc, trainable=TASK_HEADS) -> None:
    """requires_grad as pc says. With a method: only the peft parameters and the parameters of the
    modules named in `trainable` (the task head: `classifier` covers classifier.weight and .bias) train.
    With method none nothing is unfrozen; only the freezing options apply. Then freeze_embeddings freezes
    the embeddings (an output layer tied to the token embedding with them) and freeze_layers=k freezes
    blocks 0..k-1, their peft parameters included."""
    if pc.method != "none":
        own = set(peft_parameter_names(model))
        if not own:
            raise RuntimeError(f"set_trainable: peft.method {pc.method} but the model has no peft parameters; "
                               "call inject_peft first")
        for name, p in model.named_parameters():
            p.requires_grad_(name in own or _under(name, trainable))
    frozen = []
    if pc.freeze_embeddings:
        frozen += [n for n in EMBEDDINGS if getattr(model, n, None) is not None]
    if pc.freeze_layers:
        if pc.freeze_layers > len(model.blocks):
            raise UserError(f"peft.freeze_layers = {pc.freeze_layers}: the model has only {len(model.blocks)} blocks")
        frozen += [f"blocks.{i}" for i in range(pc.freeze_layers)]
    for name, p in model.named_parameters():
        if _under(name, frozen):
            p.requires_grad_(False)


def apply_peft(model: nn.Module, pc, trainable=TASK_HEADS) -> None:
    """inject_peft, then set_trainable: what a task's build_model calls for cfg.peft."""
    inject_peft(model, pc)
    set_trainable(model, pc, trainable)


# -- saving and loading what was trained ------------------------------------------------------------


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters with requires_grad (after apply_peft / set_trainable: the peft parameters and the
    task head), by their model names; each tied parameter once. LoRA's A and B are the same merged or not."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def trained_names(model: nn.Module) -> set[str]:
    """The state-dict names of the parameters that train (a tied one under each of its names)."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """adapter_state_dict as one safetensors file (written to a temporary name, then renamed)."""
    path = Path(path)
    tensors = {k: v.contiguous().cpu().clone() for k, v in adapter_state_dict(model).items()}
    atomic_write(path, lambda tmp: write_safetensors(tensors, tmp, {"format": "pt", "peft_method": peft_method(model)}))
    return path


def load_adapter(model: nn.Module, path: str | Path) -> None:
    """Copy a save_adapter file into a model with the same structure (inject_peft first). Every tensor
    must have a place of the same shape, and every peft parameter of the model must be in the file."""
    path = Path(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # missing, damaged or not safetensors: several exception types
        raise UserError(f"peft: {path}: cannot be read as an adapter ({type(e).__name__}: {one_line(e)})") from None
    state = model.state_dict()
    unknown = [k for k in tensors if k not in state]
    if unknown:
        raise UserError(f"peft: {path}: tensor {unknown[0]} has no place in the model (an adapter of another peft "
                        f"method or model: this model's method is {peft_method(model)})")
    for key in (k for k in state if k in tensors):  # the first mismatch in the model's order
        if tensors[key].shape != state[key].shape:
            raise UserError(f"peft: {path}: tensor {key} has shape {tuple(tensors[key].shape)}, the model's "
                            f"{tuple(state[key].shape)}")
    missing = [n for n in peft_parameter_names(model) if n not in tensors]
    if missing:
        raise UserError(f"peft: {path}: lacks the model's {missing[0]}"
                        f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    merged = [m for m in lora_layers(model).values() if m.merged]
    for m in merged:  # new A and B must not be subtracted from a weight that holds the old ones
        m.unmerge()
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for key, t in tensors.items():
            params[key].copy_(t)
    for m in merged:
        m.merge()


# -- the plain base model, and the Hugging Face peft format -----------------------------------------


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the peft parameters, LoRA unmerged: the plain base model's weights
    (a task head included), which load strictly into the model built without peft."""
    own = set(peft_parameter_names(model))
    state = model.state_dict()
    for name, m in lora_layers(model).items():
        if m.merged:
            state[f"{name}.weight"] = m.base_weight()
    return {k: v for k, v in state.items() if k not in own}


def strip_peft(model: nn.Module, merge: bool = False, inplace: bool = False) -> nn.Module:
    """The model without peft modules: each LoRALinear becomes an nn.Linear holding the base weight
    (with merge=True: the base weight plus the LoRA update, an equivalent plain model), adapters and
    prefixes are removed. A copy unless inplace. hf/export.py maps this model."""
    plain = model if inplace else copy.deepcopy(model)
    for name, m in lora_layers(plain).items():
        m.merge() if merge else m.unmerge()
        # a quantised base weight (not merged) keeps computing as one
        cls = QuantLinear if is_quantised(m.weight) else nn.Linear
        layer = cls(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        layer.weight, layer.bias = m.weight, m.bias
        if hasattr(m, "residual_out"):
            layer.residual_out = m.residual_out
        layer.train(m.training)
        _replace(plain, name, layer)
    if hasattr(plain, "blocks"):
        _remove_adapters(plain)
    for name, m in list(plain.named_modules()):
        if isinstance(m, PrefixAttention):
            _replace(plain, name, m.plain())
    return plain
