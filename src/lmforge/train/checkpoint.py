"""Atomic checkpoints (temp file, fsync, rename) and finding the one to resume from."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from lmforge.errors import UserError

CKPT_DIR = "checkpoints"
WEIGHTS = "model.safetensors"  # the best (or final) weights, for inference and export


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), fsync it, then rename it to `path`: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


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


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    ckpt_dir = run_dir / CKPT_DIR
    ckpt_dir.mkdir(exist_ok=True)
    path = ckpt_dir / f"step_{step:08d}.pt"
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    for old in sorted(ckpt_dir.glob("step_*.pt"))[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise UserError(f"checkpoint: {path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint in run_dir that loads, skipping damaged ones (with a warning).

    None when the run has no checkpoint; a UserError when it has some but none can be read, since
    starting over (or giving up) silently would lose the run.
    """
    damaged = []
    for path in sorted((run_dir / CKPT_DIR).glob("step_*.pt"), reverse=True):
        try:
            found = path, load_checkpoint(path)
        except UserError as e:
            damaged.append(e)
            continue
        for e in damaged:
            print(f"lmforge: warning: skipping {e}", file=sys.stderr)
        return found
    if damaged:
        raise UserError(f"checkpoint: none of the {len(damaged)} checkpoints in {run_dir / CKPT_DIR} can be read "
                        f"(newest: {str(damaged[0]).removeprefix('checkpoint: ')})")
    return None


def load_model_state(model: torch.nn.Module, state: dict, source: Path) -> None:
    """load_state_dict, with a mismatch (a checkpoint of another architecture or size) reported as one
    line naming the first bad key and both shapes."""
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            raise UserError(f"checkpoint: {source}: weight '{key}' does not exist in this model; "
                            "the checkpoint is from another architecture")
        if own[key].shape != value.shape:
            raise UserError(f"checkpoint: {source}: weight '{key}' has shape {tuple(value.shape)} but the model "
                            f"expects {tuple(own[key].shape)}")
    missing = [k for k in own if k not in state]
    if missing:
        raise UserError(f"checkpoint: {source}: weight '{missing[0]}' is missing ({len(missing)} in all); "
                        "the checkpoint is from another architecture")
    model.load_state_dict(state)


def save_weights(model: torch.nn.Module, path: Path, metadata: dict[str, str]) -> None:
    atomic_write(path, lambda tmp: save_model(model, str(tmp), metadata=metadata))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except Exception as e:  # a damaged file (SafetensorError) or tensors of other shapes (RuntimeError)
        raise UserError(f"checkpoint: {path}: cannot be loaded ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]})") from None
    if missing or unexpected:
        raise UserError(f"checkpoint: {path}: weights do not fit the model (missing: {sorted(missing)[:3]}, "
                        f"unexpected: {sorted(unexpected)[:3]})")


def find_resume(resume: str, out_dir: Path, run_dir: Path | None) -> tuple[Path, tuple[Path, dict] | None]:
    """--resume auto | RUN_DIR | CHECKPOINT -> (run directory, (checkpoint, its state) or None to start fresh).

    `auto` takes the newest readable checkpoint of log.run_dir, or of the newest run under log.out_dir,
    and starts fresh when there is none yet (so a restarted job can always pass --resume auto).
    """
    if resume == "auto":
        if run_dir is None:
            runs = [d for d in out_dir.glob("*") if any((d / CKPT_DIR).glob("step_*.pt"))]
            if not runs:
                raise UserError(f"--resume auto: no run with checkpoints under {out_dir}; set --log.run_dir to start one")
            run_dir = max(runs, key=lambda d: max(p.stat().st_mtime for p in (d / CKPT_DIR).glob("step_*.pt")))
        return run_dir, latest_checkpoint(run_dir) if run_dir.is_dir() else None
    p = Path(resume)
    if p.is_file():
        return p.parent.parent, (p, load_checkpoint(p))
    if p.is_dir():
        found = latest_checkpoint(p)
        if not found:
            raise UserError(f"--resume {p}: the run has no readable checkpoint in {p / CKPT_DIR}")
        return p, found
    raise UserError(f"--resume {resume}: no such run directory or checkpoint file; expected auto, a run directory or a .pt file")


def load_run(path: str | Path, device: str | torch.device = "cpu"):
    """A trained run directory (or one of its checkpoint files) -> (model in eval mode, tokenizer, config).

    Uses the best weights (model.safetensors) of a run directory, or the given checkpoint's weights.
    """
    from lmforge.config import load_config, read_yaml
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.tasks import make_task

    p = Path(path)
    # a file is run/model.safetensors (or another weights file beside config.yaml) or run/checkpoints/step_N.pt
    run_dir = (p.parent if (p.parent / "config.yaml").is_file() else p.parent.parent) if p.is_file() else p
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"checkpoint: {path}: not a run directory (no config.yaml); expected the folder a training run wrote")
    cfg = load_config(base=read_yaml(run_dir / "config.yaml"))
    model = make_task(cfg).build_model()
    if p.is_file() and p.suffix == ".safetensors":
        load_weights(model, p)
    elif p.is_file():
        load_model_state(model, load_checkpoint(p)["model"], p)
    elif (run_dir / WEIGHTS).is_file():
        load_weights(model, run_dir / WEIGHTS)
    else:
        found = latest_checkpoint(run_dir)
        if not found:
            raise UserError(f"checkpoint: {run_dir}: holds no weights yet ({WEIGHTS} or {CKPT_DIR}/step_*.pt)")
        load_model_state(model, found[1]["model"], found[0])
    return model.to(device).eval(), load_tokenizer(run_dir), cfg
