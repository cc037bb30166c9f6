"""Runs: anything a user names as a trained model -> the model, its tokenizer and its config.

`load_run(path)` takes a run directory (its best weights), one of its checkpoints (a step_N.pt file or
a sharded step_N directory), a weights file beside a config.yaml, or a Hugging Face model folder
(config.json and no config.yaml, imported in memory), so every command that takes a run takes any of
them. The model is built by `model.build_model` from the run's config, with its PEFT modules.

A PEFT run (a fine-tuning run with peft.method lora, adapter or prefix) keeps only what trained, the
adapter and the task head, in its weights and checkpoints: its frozen rest is finetune.init_from's,
referenced by absolute path and by a fingerprint of those frozen weights (`base_reference`), and read
from there when the run is loaded (a LoRA run of a 135M model is a few MB, not 1.1 GB of copies).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from lmforge import chat
from lmforge.config import load_config
from lmforge.data.labelled import LabelMap
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import UserError
from lmforge.hf.load import load_hf
from lmforge.io import atomic_write, load_weights, read_json, read_weights, save_weights, weights_metadata
from lmforge.model.build import build_model
from lmforge.peft import apply_peft, peft_method, strip_peft
from lmforge import quant
from lmforge.rundir import BASE_FINGERPRINT, BASE_MODEL, LABELS_FILE, WEIGHTS, read_run_config
from lmforge.tasks import registry
from lmforge.train.checkpoint import (CKPT_DIR, checkpoint_model_state, is_sharded, latest_checkpoint,
                                      load_checkpoint, load_model_state)
from lmforge.train.distributed import Dist, full_weights

# Hugging Face files a run keeps as its source had them, so that an export carries them back unchanged: the
# chat template and special tokens, and the generation settings with the model's own end tokens.
HF_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json",
                 "source_config.json")  # the last: the source config.json's token ids, which export writes back
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# --dtype of the commands that only run a model (generate, serve): auto keeps the stored dtype
INFERENCE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and not (path / "config.yaml").is_file()


def hf_side_files(path: str | Path) -> dict[str, str]:
    """HF_SIDE_FILES of a run (or its checkpoint) or of a Hugging Face folder: {name: text}. A folder with no
    generation_config.json gets one made of config.json's token ids, as transformers makes it."""
    folder = Path(path)
    folder = folder if is_hf_folder(folder) else run_dir_of(folder)
    found = {name: (folder / name).read_text(encoding="utf-8") for name in HF_SIDE_FILES if (folder / name).is_file()}
    for name in found:
        if name.endswith(".json"):
            read_json(folder / name, f"hf: {folder}")  # a damaged file is refused here, not half-carried along
    if is_hf_folder(folder):
        hf = read_json(folder / "config.json", f"hf: {folder}")
        found["source_config.json"] = json.dumps({k: hf[k] for k in TOKEN_ID_KEYS if k in hf}, indent=2) + "\n"
        ids = {k: hf[k] for k in TOKEN_ID_KEYS if hf.get(k) is not None}
        if ids and "generation_config.json" not in found:
            found["generation_config.json"] = json.dumps(ids, indent=2) + "\n"
    return found


def write_hf_side_files(run_dir: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        atomic_write(run_dir / name, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))


def end_token_ids(path: str | Path) -> set[int]:
    """The model's own end tokens: generation_config.json's eos_token_id (one id or a list, e.g. a chat
    model's <|im_end|>); none for a model lmforge trained from scratch (it ends at its end-of-text token)."""
    folder = Path(path)
    text = hf_side_files(folder).get("generation_config.json")
    if text is None:
        return set()
    where = (folder if is_hf_folder(folder) else run_dir_of(folder)) / "generation_config.json"
    eos = json.loads(text).get("eos_token_id")
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UserError(f"{where}: eos_token_id = {json.dumps(eos)}: expected a token id or a list of them")
    return set(ids)


def chat_template(path: str | Path, name: str | None = None) -> tuple[str, dict[str, str]] | None:
    """The chat template a model was fine-tuned or shipped with (or the one `name`d: chatml) and the
    special-token strings it may name, for chat.render; None for a model without one and no name."""
    side = hf_side_files(path)
    tokenizer_config = json.loads(side.get("tokenizer_config.json", "{}"))
    template = chat.template_from(tokenizer_config, side.get("chat_template.jinja"), name, f"chat: {path}")
    return None if template is None else (template, chat.token_strings(tokenizer_config))


def run_model(cfg) -> torch.nn.Module:
    """The model a run's config describes, fresh, with the PEFT modules a fine-tuning run trained (the
    peft section applies to fine-tuning only), so that the run's state dict loads strictly into it."""
    model = build_model(cfg)
    if registry.spec(cfg.task).finetune:
        apply_peft(model, cfg.peft)
    return model


def stores_trained_only(cfg) -> bool:
    """Whether a run keeps only what trains (a fine-tuning run with a PEFT method) and references its base."""
    return registry.spec(cfg.task).finetune and cfg.peft.method != "none"


def frozen_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's frozen parameters (names, shapes, fp32 values): what a PEFT run's adapter
    was trained on top of. About a second for 135M parameters. A quantised weight (peft.base_dtype)
    counts by its dequantised values, which quantising the same base again reproduces exactly."""
    digest = hashlib.blake2b(digest_size=16)
    for name, p in sorted(model.named_parameters()):
        if not p.requires_grad:
            digest.update(f"{name}{tuple(p.shape)}".encode())
            values = quant.dequantise(p.detach(), torch.float32) if quant.is_quantised(p) else p.detach()
            digest.update(values.to("cpu", torch.float32).contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def base_reference(cfg, model: torch.nn.Module) -> dict[str, str]:
    """What a PEFT run's weights and checkpoints record of its base: the model finetune.init_from names,
    by absolute path, and the fingerprint of the frozen weights it gave `model` (before any training)."""
    return {BASE_MODEL: str(Path(cfg.finetune.init_from).resolve()), BASE_FINGERPRINT: frozen_fingerprint(model)}


def load_matching(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """The tensors of `state` that `model` has at the same name and shape into it (a pretrained body into
    a task model); returns the modules left as they were (a fresh task head)."""
    own = model.state_dict()
    missing, _ = model.load_state_dict({k: v for k, v in state.items() if k in own and v.shape == own[k].shape},
                                       strict=False)
    return sorted({k.rsplit(".", 1)[0] for k in missing})


def _find_base(cfg, reference: dict, source: Path) -> Path:
    """The base a PEFT run's `source` was trained on: where it was (an absolute path), else
    finetune.init_from as the config gives it (the run was moved along with its base)."""
    for candidate in (Path(reference[BASE_MODEL]), Path(cfg.finetune.init_from or reference[BASE_MODEL])):
        if candidate.exists():
            return candidate
    raise UserError(f"checkpoint: {source}: holds only the trained weights of a PEFT run; its base model "
                    f"{reference[BASE_MODEL]} (finetune.init_from) is gone; expected it there, or export the run "
                    "(lmforge export --merge) while the base is at hand")


def _with_base(cfg, reference: dict, source: Path) -> torch.nn.Module:
    """The run's model, its PEFT modules included, holding its base's weights, which must be those the run
    was trained on (their fingerprint); the trained weights are loaded into it next."""
    base_path = _find_base(cfg, reference, source)
    base_dtype = cfg.peft.base_dtype
    if is_hf_folder(base_path):
        if base_dtype != "none":  # streamed and quantised as the run's own start was
            model = load_hf(base_path, build=lambda _: build_model(cfg), base_dtype=base_dtype).model
        else:
            model = build_model(cfg)
            load_hf(base_path, build=lambda _: model, base_dtype="none")
    else:
        model = build_model(cfg)
        base, _, _ = load_as_base(base_path)
        load_matching(model, base.state_dict())
        del base
        quant.quantise_model(model, base_dtype)
    apply_peft(model, cfg.peft)
    if frozen_fingerprint(model) != reference[BASE_FINGERPRINT]:
        raise UserError(f"checkpoint: {source}: holds only the trained weights of a PEFT run, and its base "
                        f"{base_path} has changed since the run trained on it; expected the model it was trained on")
    return model


def _saved_weights(p: Path, run_dir: Path) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """The weights `p` names (a weights file, a checkpoint, or the run's best or newest), their base
    reference ({} for whole-model weights) and the file they came from."""
    if p.is_file() and p.suffix == ".safetensors":
        path = p
    elif p != run_dir:  # a checkpoint
        state = load_checkpoint(p)
        return checkpoint_model_state(p, state), state.get("base", {}), p
    elif (run_dir / WEIGHTS).is_file():
        path = run_dir / WEIGHTS
    else:
        found = latest_checkpoint(run_dir)
        if not found:
            raise UserError(f"checkpoint: {run_dir}: holds no weights yet ({WEIGHTS} or {CKPT_DIR}/step_*.pt)")
        return checkpoint_model_state(*found), found[1].get("base", {}), found[0]
    metadata = weights_metadata(path)
    if BASE_MODEL not in metadata:  # whole-model weights: safetensors' own loader checks them strictly
        return {}, {}, path
    return read_weights(path)[0], {k: metadata[k] for k in (BASE_MODEL, BASE_FINGERPRINT)}, path


def run_dir_of(path: Path) -> Path:
    """The run directory of a run, a weights file beside its config.yaml, or a checkpoint in it."""
    if not (path.is_file() or is_sharded(path)):
        return path
    return path.parent if (path.parent / "config.yaml").is_file() else path.parent.parent


def check_labels(run_dir: Path, cfg) -> None:
    """The head's outputs are in the order of labels.json, written when the run trained; config.yaml's
    finetune.labels reordered or renamed since would silently relabel every prediction, so it is refused."""
    path = run_dir / LABELS_FILE
    if not path.is_file() or cfg.finetune.labels is None:
        return
    trained = LabelMap.load(path).labels
    if list(cfg.finetune.labels) != trained:
        raise UserError(f"{run_dir / 'config.yaml'}: finetune.labels = {cfg.finetune.labels} differs from {path} = "
                        f"{trained}, the order the model's head was trained in; expected that list")


def load_run(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32):
    """A trained run (or one of its checkpoints, or an HF folder) -> (model in eval mode, tokenizer, config).

    dtype: the model's parameters; None keeps the stored one (an HF folder's; a run's weights are fp32)."""
    p = Path(path)
    if is_hf_folder(p):
        imported = load_hf(p, dtype=dtype)
        for note in imported.notes:
            print(f"lmforge: note: {note}", file=sys.stderr)
        return imported.model.to(device).eval(), imported.tokenizer, imported.config
    run_dir = run_dir_of(p)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"checkpoint: {path}: not a run directory (no config.yaml); expected the folder a training run "
                        "wrote (lmforge runs lists those under runs/)")
    cfg = load_config(base=read_run_config(run_dir))
    check_labels(run_dir, cfg)
    state, reference, source = _saved_weights(p, run_dir)
    if reference:
        model = _with_base(cfg, reference, source)
        load_model_state(model, state, source, trained_only=True)
    else:
        model = run_model(cfg)
        if source.suffix == ".safetensors":
            load_weights(model, source)
        else:
            load_model_state(model, state, source)
    check_finite(model, source)
    return quant.to(model, device, dtype).eval(), load_tokenizer(run_dir), cfg


def check_finite(model: torch.nn.Module, source: Path) -> None:
    """Weights with a NaN or an infinity (written by a run that diverged before lmforge checked) would answer
    every input with garbage or crash the sampler: refused in one line."""
    plain = [(n, p) for n, p in model.named_parameters() if type(p.data) is torch.Tensor and p.is_floating_point()]
    bad = [n for n, p in plain if not bool(torch.isfinite(p).all())]
    if bad:
        raise UserError(f"checkpoint: {source}: {len(bad)} of {len(plain)} weight tensors hold NaN or infinite values "
                        f"(first: {bad[0]}); the run that wrote them diverged: train it again with a lower train.lr")


def load_as_base(path: str | Path) -> tuple[torch.nn.Module, object, object]:
    """load_run for a model that a new run starts from (finetune.init_from; a PEFT run's base): a LoRA run's
    update merged into its weights, so that its state dict is the plain model it computes (loaded as it is,
    the new model would take the base weights and silently drop the update). Adapters and prefixes, which
    do not fold into weights, are refused."""
    model, tok, cfg = load_run(path)
    quant.dequantise_model(model)  # a run on a quantised base: the fp32 model it computes
    method = peft_method(model)
    if method in ("adapter", "prefix"):
        raise UserError(f"finetune.init_from: {path} is a peft.method = {method} run, whose modules do not fold into "
                        "the weights; expected a full or LoRA run to start from (or that run's own base)")
    return strip_peft(model, merge=True, inplace=True), tok, cfg


def export_weights(checkpoint: Path, out: Path) -> Path:
    """Consolidate a checkpoint of either kind (a sharded one written by several processes included)
    into one safetensors file that `load_run` reads; for `lmforge export`."""
    model, _, _ = load_run(checkpoint)
    quant.dequantise_model(model)  # a quantised base (peft.base_dtype) is written as its dequantised values
    step = load_checkpoint(checkpoint)["step"]
    save_weights(full_weights(Dist(), model), out, {"step": str(step)})
    return out
