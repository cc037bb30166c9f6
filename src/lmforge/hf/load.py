"""`load_hf(folder, build)`: a Hugging Face model folder -> the equivalent lmforge model, its tokenizer
and config, in memory. `runs.load_run` calls it for any folder with a config.json and no config.yaml;
fine-tuning passes a builder of its own task model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from lmforge.config import load_config
from lmforge.errors import UserError
from lmforge.hf.arch import ACTIVATIONS, ARCHS, OPTIONAL_HEADS, REQUIRED, Arch
from lmforge.hf import keymap
from lmforge.hf.tokenizer import hf_tokenizer
from lmforge.io import read_json
from lmforge.model.build import build_model


def _find_arch(hf: dict, where: str) -> tuple[Arch, str]:
    """The Arch for a config.json, and the HF class it names."""
    classes = hf.get("architectures") or []
    model_type = hf.get("model_type")
    for arch in ARCHS.values():
        if classes and classes[0] in arch.classes:
            return arch, classes[0]
        if not classes and model_type in arch.model_types:
            return arch, model_type
    supported = ", ".join(c for a in ARCHS.values() for c in a.classes)
    found = classes[0] if classes else f"model_type {model_type!r}" if model_type else "no architectures or model_type"
    raise UserError(f"{where}: architecture {found} is not supported; lmforge imports {supported}")


def _load_tensors(path: Path, where: str) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch raise several types for a damaged file
        raise UserError(f"{where}: {path.name} cannot be read ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]})") from None


def _read_weights(folder: Path, where: str) -> dict[str, torch.Tensor]:
    """model.safetensors, pytorch_model.bin, or either sharded with its .index.json."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return _load_tensors(folder / name, where)
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(read_json(index, where).get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing or not shards:
                raise UserError(f"{where}: {index.name} names shard {missing[0] if missing else '(none)'}, "
                                "which is not in the folder")
            return {k: v for s in shards for k, v in _load_tensors(folder / s, where).items()}
    raise UserError(f"{where}: no weights; expected model.safetensors, pytorch_model.bin or a sharded "
                    "model.safetensors.index.json")


def _config_tree(arch: Arch, hf: dict, names: set[str], where: str) -> dict:
    """config.json -> the lmforge config tree (task, model, mlm) it describes."""
    for key, only in arch.fixed.items():
        if hf.get(key, only) != only:
            raise UserError(f"{where}: config.json {key} = {json.dumps(hf[key])}: lmforge computes {arch.title} "
                            f"only with {key} = {json.dumps(only)}")
    model = dict(arch.layout)
    if arch.activation:
        key, default = arch.activation
        name = hf.get(key, default)
        if name not in ACTIVATIONS:
            raise UserError(f"{where}: config.json {key} = {json.dumps(name)}: lmforge has {', '.join(ACTIVATIONS)}")
        model["mlp"] = ACTIVATIONS[name]
    for key, (ours, default) in arch.config.items():
        value = hf.get(key)
        value = default if value is None else value
        if value is REQUIRED:
            raise UserError(f"{where}: config.json has no {key}, which {arch.title} needs")
        if value is not None:
            model.setdefault(ours, value)
    tree = {"task": arch.task, "model": model}
    for section, values in (arch.read_extra(hf, names, where) if arch.read_extra else {}).items():
        tree.setdefault(section, {}).update(values)
    return tree


def _modules(names) -> str:
    """Tensor names shortened to their modules, once each, for notes."""
    return ", ".join(dict.fromkeys(n.removesuffix(".weight").removesuffix(".bias") for n in names))


def _load_weights(model: torch.nn.Module, arch: Arch, hf: dict[str, torch.Tensor], kind: str,
                  where: str) -> tuple[list[str], list[str]]:
    """Copy the checkpoint into `model` after checking every tensor against the shapes config.json
    implies; returns notes on heads left at their fresh init and tensors with no place in lmforge, and
    those heads' module names."""
    mapping, tied = keymap.mapping(arch, model)
    expected = keymap.to_hf(dict(model.named_parameters()), mapping, arch, model.cfg)
    fresh, used = [], set(tied)
    for lm, parts in mapping.items():
        if lm.startswith(OPTIONAL_HEADS) and not any(p in hf for p in parts):
            fresh.append(lm)
            continue
        for p in parts:
            if p not in hf:
                raise UserError(f"{where}: weight {p} is missing from the checkpoint (lmforge's {lm} needs it)")
            if hf[p].shape != expected[p].shape:
                raise UserError(f"{where}: weight {p} has shape {tuple(hf[p].shape)}, but config.json implies "
                                f"{tuple(expected[p].shape)}")
        used.update(parts)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for lm, tensor in keymap.to_lm(hf, {k: v for k, v in mapping.items() if k not in fresh}, arch).items():
            params[lm].copy_(tensor)
    notes = []
    if fresh:
        notes.append(f"not in the checkpoint, so left at lmforge's fresh initialisation (train before using it): "
                     f"{_modules(fresh)}")
    unused = [k for k in hf if k not in used]
    if unused:
        notes.append(f"not imported, lmforge's {kind} has no place for them: {_modules(unused)}")
    return notes, _modules(fresh).split(", ") if fresh else []



@dataclass
class Imported:
    model: torch.nn.Module  # in eval mode
    tokenizer: Tokenizer
    config: object  # lmforge.config.Config
    source: str  # the HF class, e.g. BertForMaskedLM
    notes: list[str]
    fresh: list[str]  # modules the checkpoint had no weights for (left at their fresh initialisation)

    def summary(self) -> str:
        m = self.config.model
        n = sum(p.numel() for p in self.model.parameters())
        return (f"{self.source} as an lmforge {self.config.task} model: {m.n_layer} layers, d_model {m.d_model}, "
                f"{m.n_head} heads ({m.n_kv_head} key/value), {n / 1e6:.2f}M parameters")


def _stored_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype a checkpoint's weights share; fp32 where they mix several."""
    found = {t.dtype for t in state.values() if t.is_floating_point()}
    return found.pop() if len(found) == 1 else torch.float32


def load_hf(folder: str | Path, build: Callable | None = None, dtype: torch.dtype | None = torch.float32) -> Imported:
    """A Hugging Face model folder -> the equivalent lmforge model, its tokenizer and config, in memory.

    build(config) makes the model to fill instead of the arch's own (a fine-tuning model on the same
    body): heads it has that the checkpoint lacks, or has at another size (a classifier for other
    labels), keep their fresh initialisation.

    dtype: the model's parameters; None keeps the checkpoint's own (a bf16 checkpoint stays bf16, half
    the memory, for inference). Training and import keep fp32: autocast expects fp32 master weights."""
    folder = Path(folder)
    where = f"hf: {folder}"
    if not (folder / "config.json").is_file():
        raise UserError(f"{where}: no config.json; expected a folder written by transformers' save_pretrained")
    hf_cfg = read_json(folder / "config.json", where)
    arch, source = _find_arch(hf_cfg, where)
    tok, notes = hf_tokenizer(folder, where)
    state = keymap.normalise(_read_weights(folder, where), arch)
    try:
        cfg = load_config(base=_config_tree(arch, hf_cfg, set(state), where))
    except UserError as e:
        if str(e).startswith(where):
            raise
        raise UserError(f"{where}: config.json does not describe a model lmforge can build ({e})") from None
    with torch.random.fork_rng(devices=[]):  # the same fresh heads (if any) on every import of a folder
        torch.manual_seed(cfg.train.seed)
        model = (build or build_model)(cfg)
    model.to(dtype or _stored_dtype(state))  # before the copy, so the stored values arrive unrounded
    kind = "mlm model without mlm.nsp" if cfg.task == "mlm" and not cfg.mlm.nsp else f"{cfg.task} model"
    if build:
        kind = type(model).__name__
        heads = {k: v.shape for k, v in model.state_dict().items() if k.startswith(OPTIONAL_HEADS)}
        mapping, _ = keymap.mapping(arch, model)
        for lm, parts in mapping.items():
            if lm in heads and any(p in state and state[p].shape != heads[lm] for p in parts):
                notes.append(f"{_modules(parts)} of the checkpoint has another shape than {lm} "
                             f"{tuple(heads[lm])} and was left out")
                for p in parts:
                    state.pop(p, None)
    loaded_notes, fresh = _load_weights(model, arch, state, kind, where)
    return Imported(model.eval(), tok, cfg, source, loaded_notes + notes, fresh)
