"""Atomic checkpoints (temp file, fsync, rename) and finding the one to resume from.

One process writes RUN/checkpoints/step_N.pt, one file. Several processes write step_N/, a directory
in torch.distributed.checkpoint's (DCP) format: each rank's shards of the model and optimizer, plus
EXTRAS (step, best metric, sampler position, every rank's RNG states) from rank 0. Either kind resumes
on any number of processes; `sharded_model_state` and `export_weights` consolidate a sharded one.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch

from lmforge.errors import UserError
from lmforge.io import atomic_write, fsync_dir
from lmforge.rundir import CKPT_DIR
from lmforge.train import distributed

EXTRAS = "extras.pt"  # in a sharded checkpoint: everything but the model and optimizer tensors


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """The step checkpoints in ckpt_dir, files and sharded directories, oldest first."""
    found = [p for p in ckpt_dir.glob("step_*") if re.fullmatch(r"step_\d+(\.pt)?", p.name)]
    return sorted(found, key=lambda p: int(p.name[5:].removesuffix(".pt")))


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _prune(ckpt_dir: Path, keep: int, written: Path) -> None:
    """Keep the newest `keep`; drop a checkpoint of the other kind for the same step (a damaged one
    from before a resume on another world size), so a step has one checkpoint."""
    other = written.with_suffix("") if written.suffix == ".pt" else written.with_name(written.name + ".pt")
    if other.exists():
        _remove(other)
    for old in checkpoints(ckpt_dir)[:-keep]:
        _remove(old)


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    ckpt_dir = run_dir / CKPT_DIR
    ckpt_dir.mkdir(exist_ok=True)
    path = ckpt_dir / f"step_{step:08d}.pt"
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    _prune(ckpt_dir, keep, path)
    return path


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "optimizers", [optimizer]))  # an OptimizerChain's parts


def save_sharded_checkpoint(d, run_dir: Path, step: int, model, optimizer, extras: dict, keep: int,
                            trained_only: bool = False) -> Path:
    """Every rank writes its shards into a temporary directory that rank 0 renames once all are done;
    trained_only: the parameters that train, not the frozen rest (a PEFT run's base)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    ckpt_dir = run_dir / CKPT_DIR
    path, tmp = ckpt_dir / f"step_{step:08d}", ckpt_dir / f".step_{step:08d}.tmp"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier(d)
    model_state, optim_state = get_state_dict(model, _optimizers(optimizer),
                                              options=StateDictOptions(ignore_frozen_params=trained_only))
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    if d.main:  # dcp.save returns on every rank once the metadata is written
        atomic_write(tmp / EXTRAS, lambda t: torch.save(extras, t))
        if path.exists():  # a damaged checkpoint of the same step, from a run that is being resumed
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_dir(ckpt_dir)
        _prune(ckpt_dir, keep, path)
    distributed.barrier(d)
    return path


def is_sharded(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def load_checkpoint(path: Path) -> dict:
    """A checkpoint file's whole state; for a sharded checkpoint its extras (the tensors are read by
    `load_training_state` into the model, which knows how they are to be sharded)."""
    try:
        if path.is_dir() and not is_sharded(path):
            raise FileNotFoundError(f"{path / '.metadata'} is missing")
        return torch.load(path / EXTRAS if path.is_dir() else path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise UserError(f"checkpoint: {path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _check_shapes(source: Path, own: dict, saved: dict, trained_only: bool = False) -> None:
    """A checkpoint of another architecture or size as one line naming the first bad key and both shapes.
    trained_only: `saved` holds the parameters that train (requires_grad in `own`), not the frozen rest."""
    for key, shape in saved.items():
        if key not in own:
            raise UserError(f"checkpoint: {source}: weight '{key}' does not exist in this model; "
                            "the checkpoint is from another architecture")
        if tuple(own[key].shape) != tuple(shape):
            raise UserError(f"checkpoint: {source}: weight '{key}' has shape {tuple(shape)} but the model "
                            f"expects {tuple(own[key].shape)}")
    missing = [k for k in own if k not in saved and (not trained_only or own[k].requires_grad)]
    if missing:
        raise UserError(f"checkpoint: {source}: weight '{missing[0]}' is missing ({len(missing)} in all); "
                        "the checkpoint is from another architecture")


def _sharded_shapes(path: Path) -> dict:
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k.removeprefix("model."): m.size for k, m in meta.items() if k.startswith("model.")}


def load_training_state(d, path: Path, state: dict, model, optimizer, trained_only: bool = False) -> None:
    """Model and optimizer state from a checkpoint of any kind into a model that may be wrapped for
    any number of processes (DCP reshards a sharded checkpoint to this world size). trained_only: the
    checkpoint holds the parameters that train; the model has its frozen rest already."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    if not is_sharded(path) and d.parallel != "fsdp":  # a whole-model file into whole-model replicas
        load_model_state(model, state["model"], path, trained_only)
        optimizer.load_state_dict(state["optimizer"])
        return
    options = StateDictOptions(ignore_frozen_params=trained_only, strict=not trained_only)
    model_state, optim_state = get_state_dict(model, _optimizers(optimizer), options=options)
    if is_sharded(path):
        import torch.distributed.checkpoint as dcp

        _check_shapes(path, model_state, _sharded_shapes(path))
        loaded = {"model": model_state, "optimizer": optim_state}
        with warnings.catch_warnings():  # "no process group: loading in a single process" is what we want
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(loaded, checkpoint_id=path)
        set_state_dict(model, _optimizers(optimizer), model_state_dict=loaded["model"],
                       optim_state_dict=loaded["optimizer"], options=options)
    else:  # a one-process file into FSDP: every rank reads it whole and keeps its shards
        _check_shapes(path, model_state, {k: v.shape for k, v in state["model"].items()})
        set_state_dict(model, _optimizers(optimizer), model_state_dict=state["model"],
                       optim_state_dict=_named_optimizer_state(state["optimizer"]),
                       options=StateDictOptions(full_state_dict=True, ignore_frozen_params=trained_only,
                                                strict=not trained_only))


def _named_optimizer_state(saved: dict) -> dict:
    """optimizer.state_dict() (keyed by parameter index) -> the form keyed by parameter name that
    torch.distributed.checkpoint.state_dict uses; each group carries its names (optim.param_groups)."""
    state, groups = {}, []
    for part in saved.get("chain", [saved]):
        for group in part["param_groups"]:
            names = dict(zip(group["params"], group["param_names"], strict=True))
            state.update({names[i]: s for i, s in part["state"].items() if i in names})
            groups.append({**group, "params": list(group["param_names"])})
    return {"state": state, "param_groups": groups}


def sharded_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The whole model's weights from a sharded checkpoint, in one process without a process group."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return _load_state_dict_from_keys("model", checkpoint_id=str(path))["model"]
    except Exception as e:
        raise UserError(f"checkpoint: {path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def checkpoint_model_state(path: Path, state: dict | None = None) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint of either kind (`state`: what load_checkpoint returned)."""
    if is_sharded(path):
        return sharded_model_state(path)
    return (state or load_checkpoint(path))["model"]


def average_checkpoints(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the model weights of several checkpoints (Vaswani et al. average the
    last few of a translation run: a cheap ensemble that usually adds a little BLEU)."""
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        for name, tensor in checkpoint_model_state(path).items():
            total[name] = total[name] + tensor.double() if name in total else tensor.double()
    return {name: (t / len(paths)).float() for name, t in total.items()}


def _newest_readable(run_dir: Path) -> tuple[tuple[Path, dict] | None, list[tuple[Path, UserError]]]:
    """(the newest checkpoint in run_dir that loads, or None; the newer ones that did not, newest first)."""
    damaged = []
    for path in reversed(checkpoints(run_dir / CKPT_DIR)):
        try:
            return (path, load_checkpoint(path)), damaged
        except UserError as e:
            damaged.append((path, e))
    return None, damaged


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint in run_dir that loads, skipping damaged ones (with a warning).

    None when the run has no checkpoint; a UserError when it has some but none can be read, since
    starting over (or giving up) silently would lose the run.
    """
    found, damaged = _newest_readable(run_dir)
    if found is None and damaged:
        raise UserError(f"checkpoint: none of the {len(damaged)} checkpoints in {run_dir / CKPT_DIR} can be read "
                        f"(newest: {str(damaged[0][1]).removeprefix('checkpoint: ')})")
    for _, e in damaged:
        print(f"lmforge: warning: skipping {e}", file=sys.stderr)
    return found


DAMAGED = ".damaged"  # a checkpoint that cannot be read, set aside by --resume auto (kept for a post-mortem)


def _auto_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """--resume auto's checkpoint in run_dir: the newest that loads; None to start the run over when there
    is none, with any that cannot be read renamed step_N.pt.damaged, so the new run's checkpoints and
    pruning do not mix with them (a restarted job always finds its way, and nothing is deleted)."""
    if not run_dir.is_dir():
        return None
    found, damaged = _newest_readable(run_dir)
    for path, e in damaged:
        aside = path.with_name(path.name + DAMAGED)
        with contextlib.suppress(OSError):  # under torchrun every rank tries; one rename wins
            os.replace(path, aside)
        print(f"lmforge: warning: {e}; set aside as {aside.name}", file=sys.stderr)
    return found


def load_model_state(model: torch.nn.Module, state: dict, source: Path, trained_only: bool = False) -> None:
    """load_state_dict, with a mismatch (a checkpoint of another architecture or size) reported as one
    line naming the first bad key and both shapes. trained_only: `state` holds the parameters that
    train (each must be there), the model has the frozen rest already."""
    own = model.state_dict(keep_vars=True)  # the Parameters themselves: requires_grad says which train
    _check_shapes(source, own, {k: v.shape for k, v in state.items()}, trained_only)
    model.load_state_dict(state, strict=not trained_only)


def find_resume(resume: str, out_dir: Path, run_dir: Path | None) -> tuple[Path, tuple[Path, dict] | None]:
    """--resume auto | RUN_DIR | CHECKPOINT -> (run directory, (checkpoint, its state) or None to start fresh).

    `auto` takes the newest readable checkpoint of log.run_dir, or of the newest run under log.out_dir,
    and starts fresh when there is none that loads (so a restarted job can always pass --resume auto).
    """
    if resume == "auto":
        if run_dir is None:
            runs = [d for d in out_dir.glob("*") if checkpoints(d / CKPT_DIR)]
            if not runs:
                raise UserError(f"--resume auto: no run with checkpoints under {out_dir}; set --log.run_dir to start one")
            run_dir = max(runs, key=lambda d: max(p.stat().st_mtime for p in checkpoints(d / CKPT_DIR)))
        return run_dir, _auto_checkpoint(run_dir)
    p = Path(resume)
    if p.is_file() or is_sharded(p):
        return p.parent.parent, (p, load_checkpoint(p))
    if p.is_dir():
        found = latest_checkpoint(p)
        if not found:
            raise UserError(f"--resume {p}: the run has no readable checkpoint in {p / CKPT_DIR}")
        return p, found
    raise UserError(f"--resume {resume}: no such run directory or checkpoint; expected auto, a run directory, "
                    "a .pt file or a step_N directory")
