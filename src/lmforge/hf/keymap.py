"""Pure maps between lmforge's state-dict names and an architecture's HF names, both ways: no files, no
configs, only names and tensors (torchtune keeps its convert_weights the same way). Import, export and
the peft adapter export all go through `mapping`, so the directions cannot drift apart."""

from __future__ import annotations

import torch

from lmforge.hf.arch import OLD_SUFFIXES, Arch


def mapping(arch: Arch, model: torch.nn.Module) -> tuple[dict[str, tuple[str, ...]], set[str]]:
    """The arch's weight table expanded for this model: {lmforge parameter: HF names}, and the HF names
    of tied copies (an output weight that is the token embedding), which are neither read nor written."""
    names, params = model.state_dict().keys(), dict(model.named_parameters())  # named_parameters drops tied aliases
    mapping = {}
    for lm, hf in arch.weights.items():
        hf = (hf,) if isinstance(hf, str) else hf
        for i in range(model.cfg.n_layer) if "{i}" in lm else [0]:
            name, parts = lm.format(i=i), tuple(p.format(i=i) for p in hf)
            if name in names:
                mapping[name] = parts
            else:
                mapping.update({f"{name}.{s}": tuple(f"{p}.{s}" for p in parts)
                                for s in ("weight", "bias") if f"{name}.{s}" in names})
    unmapped = [p for p in params if p not in mapping]
    if unmapped:  # a gap in a table above, not a user mistake
        raise RuntimeError(f"hf: no {arch.title} name for lmforge parameter {unmapped[0]}")
    tied = {p for lm, parts in mapping.items() if lm not in params for p in parts}
    return {lm: parts for lm, parts in mapping.items() if lm in params}, tied


def split_sizes(lm: str, n_parts: int, rows: int, m) -> list[int]:
    """Rows of each HF tensor stacked into lmforge's fused `lm`: q, k, v (k and v with n_kv_head heads),
    or equal parts (gate, up)."""
    if ".attn.qkv." in lm:
        return [m.n_head * m.head_dim] + [m.n_kv_head * m.head_dim] * 2
    return [rows // n_parts] * n_parts


def to_hf(tensors: dict[str, torch.Tensor], mapping: dict, arch: Arch, m) -> dict[str, torch.Tensor]:
    """lmforge tensors -> HF tensors (views: split fused tensors, transpose Conv1D weights)."""
    out = {}
    for lm, parts in mapping.items():
        t = tensors[lm]
        pieces = t.split(split_sizes(lm, len(parts), t.shape[0], m)) if len(parts) > 1 else (t,)
        for name, piece in zip(parts, pieces, strict=True):
            out[name] = piece.t() if name.endswith(arch.conv1d) else piece
    return out


def to_lm(hf: dict[str, torch.Tensor], mapping: dict, arch: Arch) -> dict[str, torch.Tensor]:
    """HF tensors -> lmforge tensors (the inverse of _to_hf)."""
    return {lm: torch.cat([hf[p].t() if p.endswith(arch.conv1d) else hf[p] for p in parts])
            for lm, parts in mapping.items()}



def normalise(state: dict[str, torch.Tensor], arch: Arch) -> dict[str, torch.Tensor]:
    """Checkpoint names as the *For* classes write them: gamma/beta renamed, the base-model prefix added
    where a bare base model saved without it, buffers dropped, a copy kept only where its original is absent."""
    bare = not any(k.startswith(arch.prefix) for k in state)
    out = {}
    for key, tensor in state.items():
        for old, new in OLD_SUFFIXES.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        if not key.endswith(arch.skip):
            out[arch.prefix + key if bare else key] = tensor
    for copy, original in arch.copies.items():
        if copy in out:
            out.setdefault(original, out.pop(copy))
    return out


def lora_tensors(layers: dict, mapping: dict, arch: Arch, m) -> tuple[dict[str, torch.Tensor], list[str], list[bool]]:
    """A LoRA model's A and B under the keys HF peft gives them on the exported base model: (tensors,
    target modules, whether each target is a GPT-2 Conv1D). layers: {lmforge module: LoRALinear};
    mapping: `mapping(arch, <the model without peft>)`.

    A LoRA on a fused lmforge layer (attn.qkv = q, k, v; Llama's mlp.up = gate, up) becomes one LoRA
    per HF layer with the same A and the rows of B split as the weight's rows are: B A split by rows is
    each part's update. A name with no HF tensor of its own raises KeyError."""
    tensors, targets, conv = {}, [], []
    for name, layer in layers.items():
        parts = mapping[f"{name}.weight"]
        A, B = layer.lora_A.detach(), layer.lora_B.detach()
        sizes = split_sizes(f"{name}.weight", len(parts), B.shape[0], m) if len(parts) > 1 else [B.shape[0]]
        for part, b in zip(parts, B.split(sizes), strict=True):
            module = part.removesuffix(".weight")
            tensors[f"base_model.model.{module}.lora_A.weight"] = A.contiguous().cpu().clone()
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous().cpu().clone()
            targets.append(module)
            conv.append(part.endswith(arch.conv1d))
    return tensors, targets, conv
