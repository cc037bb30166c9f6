"""Files that are whole or absent: atomic writes of files and folders, and safetensors weights.

A leaf module (it imports no other lmforge module but errors): the training checkpoints, the run
directory, the caches, exports and reports all write through it. torch and safetensors are imported
where weights are read or written, so the config and the CLI can write files without loading torch.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.errors import EnvironmentFault, UserError, one_line

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
_FULL_DISK_WORDS = ("No space left", "StorageFull", "file write failed", "unexpected pos")


def size_text(n: float) -> str:
    """A number of bytes for a message: 12.3 MiB, 4.0 GiB, 11.6 TiB."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"  # a full disk's few bytes left


def free_space(path: Path) -> str:
    """The free space on the file system that holds `path` (its nearest existing parent), for a message."""
    for folder in [path, *path.parents]:
        with contextlib.suppress(OSError):
            return f"{size_text(shutil.disk_usage(folder).free)} free"
    return "free space unknown"


def _file_in_the_way(path: Path) -> Path | None:
    """The file where a folder was to be made: `path` or one of its parents (the nearest that exists)."""
    existing = next((p for p in [path, *path.parents] if p.exists() or p.is_symlink()), None)
    return existing if existing is not None and not existing.is_dir() else None


def _as_os_error(e: BaseException) -> BaseException:
    """The OSError behind a Rust library's plain Exception ("Not a directory (os error 20)": tokenizers,
    safetensors), so that it is told apart as one raised by Python is; any other error as it is."""
    found = None if isinstance(e, OSError) else re.search(r"\(os error (\d+)\)", str(e))
    return OSError(int(found[1]), os.strerror(int(found[1]))) if found else e


def write_fault(path: Path, e: BaseException) -> UserError | None:
    """The one line for a write of `path` that failed with `e`, or None where `e` is not about the file
    system (a bug, which keeps its traceback)."""
    e = _as_os_error(e)
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
        blocker = _file_in_the_way(path)
        if blocker == path:
            return UserError(f"{path}: is a file; expected a folder there, or nothing")
        if blocker is not None:
            return UserError(f"{path}: cannot be written: {blocker} is a file; expected a folder there, or nothing")
        return UserError(f"{path}: cannot be written: something is in the way ({e.strerror}); expected a folder "
                         "there, or nothing")
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


def _missing_folders(path: Path) -> list[Path]:
    """The folders above `path` that are not there yet, innermost first."""
    return list(itertools.takewhile(lambda p: not (p.exists() or p.is_symlink()), path.parents))


@contextlib.contextmanager
def new_folders(path: Path, make: bool = True):
    """With `make`, the folders missing above `path` are created; a failure inside the block removes them
    again (once what it wrote there is gone), so a refused write leaves no empty folders behind either."""
    created = _missing_folders(path) if make else []
    try:
        if created:
            with writing(path):
                path.parent.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException:
        for folder in created:  # innermost first; one that another writer filled meanwhile stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _remove_quietly(path: Path) -> None:
    """Remove a temp file or folder; on a read-only disk or under a file in the way there is none to remove,
    and the error that stopped the write is the one to report."""
    with contextlib.suppress(OSError):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def atomic_write(path: Path, write, parents: bool = False) -> None:
    """Call write(tmp_path), fsync it, then rename it to `path`: readers see the old file or the new one.
    A full or read-only disk is one line, and leaves neither a temp file nor half a file. parents: create
    the folders missing above `path` (and nothing stays of them when the write fails)."""
    tmp = temp_path(path)
    with new_folders(path, parents):
        try:
            with writing(path):
                write(tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                fsync_dir(path.parent)
        finally:
            _remove_quietly(tmp)  # before the new folders go: they are empty only without it


def atomic_text(path: Path, text: str, parents: bool = False) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), parents)


def atomic_dir(final: Path, fill) -> None:
    """fill(tmp) builds a temporary sibling folder that is then renamed to `final` (replacing an empty
    folder there), so no reader sees half of it and a failure leaves nothing at `final`, nor the folders it
    made above it."""
    tmp = temp_path(final)
    _remove_quietly(tmp)
    with new_folders(final):
        try:
            with writing(final):
                tmp.mkdir()
                fill(tmp)
                os.replace(tmp, final)
        except UserError as e:  # a refused write inside fill names the file the user will look for, not the temp
            raise type(e)(str(e).replace(str(tmp), str(final))) from None
        finally:
            _remove_quietly(tmp)


def fill_folder(folder: Path, fill) -> None:
    """fill(folder) writes the first files of a folder: a new one (missing or empty) is made whole by
    atomic_dir, so a refused write leaves none of it; one that holds files already (a resumed run) is filled
    in place, each refused write one line."""
    if folder.is_dir() and any(folder.iterdir()):
        with writing(folder):
            fill(folder)
    else:
        atomic_dir(folder, fill)


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
        raise UserError(f"checkpoint: {path}: cannot be loaded ({type(e).__name__}: {one_line(e)})") from None
    if missing or unexpected:
        raise UserError(f"checkpoint: {path}: weights do not fit the model (missing: {sorted(missing)[:3]}, "
                        f"unexpected: {sorted(unexpected)[:3]})")


def _unreadable(path: Path, e: Exception) -> UserError:
    return UserError(f"checkpoint: {path}: cannot be read ({type(e).__name__}: {one_line(e)})")


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
