"""Files that are whole or absent: atomic writes of files and folders, and safetensors weights.

A leaf module (it imports no other lmforge module but errors): the training checkpoints, the run
directory, the caches, exports and reports all write through it. torch and safetensors are imported
where weights are read or written, so the config and the CLI can write files without loading torch.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.errors import EnvironmentFault, UserError

if TYPE_CHECKING:
    import torch


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (the directory entry, not only the file, must reach the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- a failed write is the machine's fault or the user's, in one line --------------------------------------

# what the messages of libraries that do not raise OSError (torch.save's zip writer, safetensors' and
# tokenizers' Rust code) say when the disk is full
_FULL_DISK_WORDS = ("No space left", "os error 28", "StorageFull", "file write failed", "unexpected pos")


def free_space(path: Path) -> str:
    """The free space on the file system that holds `path` (its nearest existing parent), for a message."""
    for folder in [path, *path.parents]:
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(folder).free
            unit, size = next((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if free >= s or s == 2**10)
            return f"{free / size:.1f} {unit} free"
    return "free space unknown"


def write_fault(path: Path, e: BaseException) -> UserError | None:
    """The one line for a write of `path` that failed with `e`, or None where `e` is not about the file
    system (a bug, which keeps its traceback)."""
    code = e.errno if isinstance(e, OSError) else None
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and any(w in str(e) for w in _FULL_DISK_WORDS)):
        return EnvironmentFault(f"{path}: cannot be written: the disk is full ({free_space(path)}); free some space or "
                                "write elsewhere")
    if code == errno.EROFS:
        return EnvironmentFault(f"{path}: cannot be written: the file system is read-only; write elsewhere")
    if code in (errno.EACCES, errno.EPERM):
        return EnvironmentFault(f"{path}: cannot be written: permission denied; write elsewhere")
    if code == errno.EISDIR:
        return UserError(f"{path}: is a folder; expected the path of a file to write")
    if code in (errno.ENOTDIR, errno.EEXIST):
        return UserError(f"{path}: a file is in the way ({e.strerror}); expected a folder there, or no file")
    if isinstance(e, OSError):
        return EnvironmentFault(f"{path}: cannot be written ({e.strerror or e})")
    return None


@contextlib.contextmanager
def writing(path: Path):
    """Whatever is written under `path` inside this block: a file system that refuses it is one line."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # OSError, and the libraries' own errors for a full disk
        fault = write_fault(Path(path), e)
        if fault is None:
            raise
        raise fault from None


# -- writes that are whole or absent ---------------------------------------------------------------------

TEMP_TAG = ".tmp"  # a write in progress: .NAME.tmp-PID beside its target (.NAME.tmp: a sharded checkpoint's)


def temp_path(path: Path) -> Path:
    """Where a write of `path` goes first: a hidden sibling named after the writing process."""
    return path.with_name(f".{path.name}{TEMP_TAG}-{os.getpid()}")


def _writer_gone(name: str) -> bool:
    """A temp name's writer has exited (a killed write), as far as this machine can tell."""
    pid = name.rpartition(f"{TEMP_TAG}-")[2]
    if not pid.isdigit():
        return True  # no process of its own: a sharded checkpoint's folder, stale once the run starts again
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, another user's
    return False


def sweep_temps(folder: Path) -> list[Path]:
    """Remove what killed writes left in `folder` (temp files and folders whose process has exited); the
    removed paths, for a note."""
    swept = []
    for p in folder.glob(f".*{TEMP_TAG}*") if folder.is_dir() else []:
        if _writer_gone(p.name):
            with contextlib.suppress(OSError):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                swept.append(p)
    return swept


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), fsync it, then rename it to `path`: readers see the old file or the new one.
    A full or read-only disk is one line, and leaves neither a temp file nor half a file."""
    tmp = temp_path(path)
    try:
        with writing(path):
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_dir(final: Path, fill) -> None:
    """fill(tmp) builds a temporary sibling folder that is then renamed to `final` (replacing an empty
    folder there), so no reader sees half of it and a failure leaves nothing at `final`."""
    tmp = temp_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(final):
            tmp.mkdir(parents=True)
            fill(tmp)
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """save_file, then the mode any new file gets (0666 less the umask): safetensors creates its files
    0600, which would make a run or an export unreadable to the other users of a shared folder."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Whole-model weights (each tied tensor once, see distributed.full_weights) as safetensors."""
    atomic_write(path, lambda tmp: write_safetensors(state, tmp, metadata))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """A safetensors file into `model`, strictly; a damaged file or one of another model is one line."""
    from safetensors.torch import load_model

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
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as e:  # SafetensorError, OSError, ... for a missing, truncated or foreign file
        raise _unreadable(path, e) from None


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata; a damaged or foreign file is one line."""
    from safetensors.torch import load_file

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
