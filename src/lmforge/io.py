"""Files that are whole or absent: atomic writes of files and folders, and safetensors weights.

A leaf module (it imports no other lmforge module but errors): the training checkpoints, the run
directory, the caches, exports and reports all write through it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file

from lmforge.errors import UserError


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (the directory entry, not only the file, must reach the disk)."""
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
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_dir(final: Path, fill) -> None:
    """fill(tmp) builds a temporary sibling folder that is then renamed to `final` (replacing an empty
    folder there), so no reader sees half of it and a failure leaves nothing at `final`."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """save_file, then the mode any new file gets (0666 less the umask): safetensors creates its files
    0600, which would make a run or an export unreadable to the other users of a shared folder."""
    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Whole-model weights (each tied tensor once, see distributed.full_weights) as safetensors."""
    atomic_write(path, lambda tmp: write_safetensors(state, tmp, metadata))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """A safetensors file into `model`, strictly; a damaged file or one of another model is one line."""
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except Exception as e:  # a damaged file (SafetensorError) or tensors of other shapes (RuntimeError)
        raise UserError(f"checkpoint: {path}: cannot be loaded ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]})") from None
    if missing or unexpected:
        raise UserError(f"checkpoint: {path}: weights do not fit the model (missing: {sorted(missing)[:3]}, "
                        f"unexpected: {sorted(unexpected)[:3]})")


def _unreadable(path: Path, e: Exception) -> UserError:
    return UserError(f"checkpoint: {path}: cannot be read ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")


def weights_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata (its header only: the tensors are not read)."""
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as e:  # SafetensorError, OSError, ... for a missing, truncated or foreign file
        raise _unreadable(path, e) from None


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata; a damaged or foreign file is one line."""
    metadata = weights_metadata(path)
    try:
        return load_file(str(path)), metadata
    except Exception as e:
        raise _unreadable(path, e) from None


def read_json(path: Path, where: str) -> dict:
    """A JSON object from `path`; anything else is one line naming `where` and the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{where}: {path.name} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: {path.name}: expected a JSON object")
    return data
