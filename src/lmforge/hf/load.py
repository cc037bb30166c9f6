"""`load_hf(folder, build)`: a Hugging Face model folder -> the equivalent lmforge model, its tokenizer
and config, in memory. `runs.load_run` calls it for any folder with a config.json and no config.yaml;
fine-tuning passes a builder of its own task model.

With a quantised base (`base_dtype` int8 or nf4: peft.base_dtype, lmforge/quant.py) the import streams:
the model is built on the meta device (nothing allocated, no initialisation), the checkpoint's tensors are
read one at a time from the file (safetensors read with plain reads, not memory-mapped, so the file's
pages do not count as the process's memory), and each block Linear's weight is quantised as it arrives,
so the import never holds the full-precision base at once."""

from __future__ import annotations

import contextlib
import contextvars
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

from lmforge.config import load_config
from lmforge.errors import UserError, one_line
from lmforge.hf.arch import ACTIVATIONS, ARCHS, OPTIONAL_HEADS, REQUIRED, Arch, model_value
from lmforge.hf import keymap
from lmforge.hf.tokenizer import hf_tokenizer
from lmforge.io import read_json
from lmforge.model.build import build_model, check_memory
from lmforge import quant


def _find_arch(hf: dict, where: str) -> tuple[Arch, str]:
    """The Arch for a config.json, and the HF class it names."""
    classes = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{where}: config.json architectures = {json.dumps(classes)}: expected a list of class names, "
                        "e.g. [\"LlamaForCausalLM\"]")
    if model_type is not None and not isinstance(model_type, str):
        raise UserError(f"{where}: config.json model_type = {json.dumps(model_type)}: expected a string, e.g. \"llama\"")
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
        raise UserError(f"{where}: {path.name} cannot be read ({type(e).__name__}: {one_line(e)})") from None


# safetensors' dtype names (its header's "dtype")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


@dataclass(frozen=True)
class Stored:
    """One tensor of a safetensors file, not read yet: its dtype and shape from the header, `load()` reads
    it (plain file reads into memory of its own, so nothing of the file stays mapped)."""

    path: Path
    start: int  # the byte offset of its data in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    where: str

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def load(self) -> torch.Tensor:
        if not self.nbytes:
            return torch.empty(self.shape, dtype=self.dtype, device="cpu")
        buffer = bytearray(self.nbytes)
        try:
            with open(self.path, "rb") as f:
                f.seek(self.start)
                if f.readinto(buffer) != self.nbytes:
                    raise EOFError("the file ends before the tensor's data")
        except (OSError, EOFError) as e:
            raise UserError(f"{self.where}: {self.path.name} cannot be read ({type(e).__name__}: {e})") from None
        return torch.frombuffer(buffer, dtype=self.dtype).reshape(self.shape)


def _safetensors_index(path: Path, where: str) -> dict[str, Stored]:
    """A safetensors file's tensors as Stored handles, from its header alone (8 bytes of header length, then
    the JSON header: each tensor's dtype, shape and byte range after the header)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(f.read(length))
        size = path.stat().st_size
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(n) for n in info["shape"])
            if 8 + length + end > size or end - begin != dtype.itemsize * int(torch.Size(shape).numel()):
                raise ValueError(f"tensor {name}'s byte range does not fit its shape or the file")
            out[name] = Stored(path, 8 + length + begin, end - begin, dtype, shape, where)
        return out
    except Exception as e:  # a damaged or foreign file: struct, JSON, key and value errors
        raise UserError(f"{where}: {path.name} cannot be read ({type(e).__name__}: {one_line(e)})") from None


def _tensor(value) -> torch.Tensor:
    return value.load() if isinstance(value, Stored) else value


def _read_weights(folder: Path, where: str, lazy: bool = False) -> dict[str, torch.Tensor]:
    """model.safetensors, pytorch_model.bin, or either sharded with its .index.json. lazy: safetensors
    tensors as Stored handles, read when used (a .bin file is read whole either way)."""
    def read(path: Path) -> dict:
        return _safetensors_index(path, where) if lazy and path.suffix == ".safetensors" else _load_tensors(path, where)

    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return read(folder / name)
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = _shards(folder, index, where)
            return {k: v for s in shards for k, v in read(s).items()}
    raise UserError(f"{where}: no weights; expected model.safetensors, pytorch_model.bin or a sharded "
                    "model.safetensors.index.json")


def _shards(folder: Path, index: Path, where: str) -> list[Path]:
    """The shard files a .index.json names: files inside `folder`, none of them by a path or a link that leads
    out of it (a downloaded folder must not make lmforge read files elsewhere)."""
    weight_map = read_json(index, where).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{where}: {index.name}: expected a weight_map object of tensor names to shard file names")
    shards = sorted(set(weight_map.values()))
    if not shards:
        raise UserError(f"{where}: {index.name} names no shard; expected a weight_map of tensor names to shard files")
    inside = folder.resolve()
    for shard in shards:
        path = folder / shard
        if Path(shard).is_absolute() or inside not in path.resolve().parents:
            raise UserError(f"{where}: {index.name} names shard {shard}, which lies outside the folder; expected the "
                            "name of a file in it")
        if not path.is_file():
            raise UserError(f"{where}: {index.name} names shard {shard}, which is not in the folder")
    return [folder / shard for shard in shards]


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
        if not isinstance(name, str) or name not in ACTIVATIONS:
            raise UserError(f"{where}: config.json {key} = {json.dumps(name)}: lmforge has {', '.join(ACTIVATIONS)}")
        model["mlp"] = ACTIVATIONS[name]
    for key, (ours, default) in arch.config.items():
        value = hf.get(key)
        value = default if value is None else value
        if value is REQUIRED:
            raise UserError(f"{where}: config.json has no {key}, which {arch.title} needs")
        if value is not None:  # of several keys for one field (dropout) the first sets it; each is checked
            model.setdefault(ours, model_value(key, ours, value, where))
    tree = {"task": arch.task, "model": model}
    for section, values in (arch.read_extra(hf, names, where) if arch.read_extra else {}).items():
        tree.setdefault(section, {}).update(values)
    return tree


def _modules(names) -> str:
    """Tensor names shortened to their modules, once each, for notes."""
    return ", ".join(dict.fromkeys(n.removesuffix(".weight").removesuffix(".bias") for n in names))


def _load_weights(model: torch.nn.Module, arch: Arch, hf: dict[str, torch.Tensor], kind: str,
                  where: str, base_dtype: str = "none", dtype: torch.dtype = torch.float32,
                  seed: int = 0) -> tuple[list[str], list[str]]:
    """Copy the checkpoint into `model` after checking every tensor against the shapes config.json
    implies; returns notes on heads left at their fresh init and tensors with no place in lmforge, and
    those heads' module names. With a base_dtype the model is on the meta device and is filled tensor by
    tensor (_stream)."""
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
    loaded = {k: v for k, v in mapping.items() if k not in fresh}
    if base_dtype != "none":
        _stream(model, arch, hf, loaded, base_dtype, dtype, seed)
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for lm, tensor in keymap.to_lm(hf, loaded, arch).items():
                params[lm].copy_(tensor)
    notes = []
    if fresh:
        notes.append(f"not in the checkpoint, so left at lmforge's fresh initialisation (train before using it): "
                     f"{_modules(fresh)}")
    unused = [k for k in hf if k not in used]
    if unused:
        notes.append(f"not imported, lmforge's {kind} has no place for them: {_modules(unused)}")
    return notes, _modules(fresh).split(", ") if fresh else []


def _set_parameter(model: nn.Module, name: str, param: nn.Parameter) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, param)


def _stream(model: nn.Module, arch: Arch, hf: dict, mapping: dict[str, tuple[str, ...]], base_dtype: str,
            dtype: torch.dtype, seed: int) -> None:
    """Fill a model built on the meta device from the checkpoint one lmforge tensor at a time: each block
    Linear's weight quantised as it is read (quant.targets), every other tensor in `dtype`; a weight tied
    to another (the output head to the token embedding) shared again; what the checkpoint lacks (a fresh
    task head) initialised as the model initialises it, from `seed`; the RoPE tables computed."""
    quant.as_quant_linears(model)
    quantised = {f"{n}.weight" for n in quant.targets(model)}
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    params = dict(model.named_parameters())
    for lm, parts in mapping.items():
        if len(parts) == 1 and not parts[0].endswith(arch.conv1d):
            tensor = _tensor(hf[parts[0]])  # no copy: the tensor read is the parameter
        else:
            tensor = keymap.to_lm({p: _tensor(hf[p]) for p in parts}, {lm: parts}, arch)[lm]
        if lm in quantised:
            module = model.get_submodule(lm.rpartition(".")[0])
            quant.set_quantised(module, tensor.to(torch.float32), base_dtype, lm)
            del tensor
            quant.release_freed()
            continue
        param = nn.Parameter(tensor.to(dtype).contiguous(), requires_grad=params[lm].requires_grad)
        for alias in names_of[id(params[lm])]:  # one Parameter under each name of a tied weight
            _set_parameter(model, alias, param)
        del tensor, param
    fresh = list(dict.fromkeys(n.rpartition(".")[0] for n, p in model.named_parameters() if p.is_meta))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in fresh:
            module = model.get_submodule(name)
            module.to_empty(device="cpu", recurse=False)
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            if hasattr(model, "_init"):
                model._init(module)
            module.to(dtype)
    if any(b.is_meta for b in model.buffers()):
        model.reset_buffers()


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


_BASE_DTYPE: contextvars.ContextVar[str] = contextvars.ContextVar("lmforge_import_base_dtype", default="none")


@contextlib.contextmanager
def quantised_imports(base_dtype: str):
    """Inside the block, load_hf calls that do not say a base_dtype import with this one: the training loop
    sets peft.base_dtype around a task's set-up, so that the task's own import of its pretrained model
    streams into quantised layers without the task knowing of quantisation."""
    token = _BASE_DTYPE.set(base_dtype)
    try:
        yield
    finally:
        _BASE_DTYPE.reset(token)


def load_hf(folder: str | Path, build: Callable | None = None, dtype: torch.dtype | None = torch.float32,
            base_dtype: str | None = None) -> Imported:
    """A Hugging Face model folder -> the equivalent lmforge model, its tokenizer and config, in memory.

    build(config) makes the model to fill instead of the arch's own (a fine-tuning model on the same
    body): heads it has that the checkpoint lacks, or has at another size (a classifier for other
    labels), keep their fresh initialisation.

    dtype: the model's parameters; None keeps the checkpoint's own (a bf16 checkpoint stays bf16, half
    the memory, for inference). Training and import keep fp32: autocast expects fp32 master weights.

    base_dtype: int8 or nf4 quantises every Linear of the blocks while streaming the checkpoint in (see the
    module's doc); none copies it into a model built as usual; None (the default) takes quantised_imports'."""
    folder = Path(folder)
    where = f"hf: {folder}"
    if not (folder / "config.json").is_file():
        raise UserError(f"{where}: no config.json; expected a folder written by transformers' save_pretrained")
    hf_cfg = read_json(folder / "config.json", where)
    arch, source = _find_arch(hf_cfg, where)
    tok, notes = hf_tokenizer(folder, where)
    base_dtype = _BASE_DTYPE.get() if base_dtype is None else base_dtype
    streaming = base_dtype != "none"
    if streaming:
        quant.check(base_dtype, torch.device("cpu"))  # torchao missing: one line before reading anything
    state = keymap.normalise(_read_weights(folder, where, lazy=streaming), arch)
    try:
        cfg = load_config(base=_config_tree(arch, hf_cfg, set(state), where))
    except UserError as e:
        if str(e).startswith(where):
            raise
        raise UserError(f"{where}: config.json does not describe a model lmforge can build ({e})") from None
    if not streaming:  # a size this machine cannot hold is named by its config.json key, before any allocation
        check_memory(cfg, f"{where}: config.json", {ours: key for key, (ours, _) in reversed(arch.config.items())})
    with torch.random.fork_rng(devices=[]):  # the same fresh heads (if any) on every import of a folder
        torch.manual_seed(cfg.train.seed)
        with torch.device("meta") if streaming else contextlib.nullcontext():
            model = (build or build_model)(cfg)
    if not streaming:
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
    loaded_notes, fresh = _load_weights(model, arch, state, kind, where, base_dtype, dtype or _stored_dtype(state),
                                        cfg.train.seed)
    return Imported(model.eval(), tok, cfg, source, loaded_notes + notes, fresh)
