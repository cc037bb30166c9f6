"""Resume always finds its way back: a run killed (kill -9) while writing its first checkpoint, a full disk,
and a token cache damaged or cut short since it was written. Nothing half-written is left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import tiny_config, tiny_overrides
from lmforge.cli import main
from lmforge.data.store import prepare_tokens
from lmforge.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # subprocesses and short training runs

ROOT = Path(__file__).resolve().parents[1]


def cli_args(overrides: dict) -> list[str]:
    return [x for k, v in overrides.items() for x in (f"--{k}", str(v))]


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*tmp*"))


# A run whose first checkpoint write is killed with SIGKILL half-way: torch.save writes part of the
# file, then the process dies as a `kill -9` would (no handler, no cleanup).
KILLED_IN_FIRST_CHECKPOINT = """
import os, signal, sys
import torch
from lmforge.train import checkpoint

real_save = torch.save
def dying_save(obj, f, *a, **k):
    real_save(obj, f, *a, **k)
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    os.kill(os.getpid(), signal.SIGKILL)

checkpoint.torch.save = dying_save
from lmforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_auto_after_a_kill_during_the_first_checkpoint(tmp_path, corpus, capsys):
    over = tiny_overrides(tmp_path, corpus, **{"train.checkpoint_every": 2, "train.max_steps": 4})
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", KILLED_IN_FIRST_CHECKPOINT, "pretrain", *cli_args(over)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    run = tmp_path / "run"
    left = temp_files(run)
    assert left and all(name.startswith(".step_00000002.pt.tmp-") for name in left)  # only the killed write

    capsys.readouterr()
    assert main(["pretrain", "--resume", "auto", *cli_args(over)]) == 0
    out = capsys.readouterr().out
    assert "holds no checkpoint to resume; starting the run from step 0" in out
    assert "removed 1 temporary file(s) that killed writes left" in out
    assert temp_files(run) == []
    assert load_checkpoint(run / "checkpoints" / "step_00000004.pt")["step"] == 4
    # the same command again, without --resume, is refused now: the run has checkpoints
    capsys.readouterr()
    assert main(["pretrain", *cli_args(over)]) == 2
    assert "already holds a run; use --resume auto" in capsys.readouterr().err


def namespace_shell(script: str) -> subprocess.CompletedProcess:
    """`script` in a private mount namespace (so it may mount a small tmpfs); skipped where that is not allowed."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("user namespaces are not allowed here, so no tmpfs can be mounted")
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, timeout=300)


def test_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_room(tmp_path, corpus):
    """The run directory on a 96 KiB tmpfs: the first checkpoint (about 230 KB) does not fit. One line that
    says the disk is full and how much is free, exit 1, no temp file; then the disk grows (a remount) and
    --resume auto starts the run over and finishes it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    over = tiny_overrides(tmp_path, corpus, **{"train.checkpoint_every": 2, "train.max_steps": 4,
                                               "log.run_dir": str(disk / "run")})
    lmforge = f"{sys.executable} -m lmforge"
    args = " ".join(cli_args(over))
    script = (f"mount -t tmpfs -o size=96k tmpfs {disk} && export PYTHONPATH={ROOT / 'src'} && "
              f"{lmforge} pretrain {args} 2>{tmp_path / 'err1'}; echo $? > {tmp_path / 'rc1'}; "
              f"ls -A {disk}/run {disk}/run/checkpoints > {tmp_path / 'left'} 2>&1; "
              f"mount -o remount,size=8m {disk} && {lmforge} pretrain --resume auto {args} "
              f"> {tmp_path / 'out2'} 2>&1; echo $? > {tmp_path / 'rc2'}; "
              f"ls {disk}/run/checkpoints > {tmp_path / 'final'}")
    proc = namespace_shell(script)
    assert (tmp_path / "rc1").is_file(), proc.stderr
    err = (tmp_path / "err1").read_text().strip().splitlines()
    assert (tmp_path / "rc1").read_text().strip() == "1", err
    assert len(err) == 1 and err[0].startswith("lmforge: error: "), err
    assert "the disk is full" in err[0] and " KiB free" in err[0], err[0]
    assert str(disk / "run") in err[0]
    assert ".tmp" not in (tmp_path / "left").read_text()  # the failed write left nothing half-written
    assert (tmp_path / "rc2").read_text().strip() == "0", (tmp_path / "out2").read_text()
    assert "step_00000004.pt" in (tmp_path / "final").read_text()


def store_of(tmp_path: Path) -> Path:
    (store,) = (tmp_path / "cache").glob("store-*")
    return store


@pytest.mark.parametrize("damage", ["flipped-bytes", "cut-short", "bad-meta", "meta-without-record"])
def test_a_damaged_token_cache_is_rebuilt_with_a_note(tmp_path, corpus, capsys, damage):
    cfg = tiny_config(tmp_path, corpus)
    first = prepare_tokens(cfg.data, cfg.model.max_seq_len)
    train, val = np.array(first.train), np.array(first.val)
    store = store_of(tmp_path)
    tokens, meta = store / "tokens.bin", store / "meta.json"
    del first
    if damage == "flipped-bytes":
        data = bytearray(tokens.read_bytes())
        data[100:104] = bytes(b ^ 0xFF for b in data[100:104])
        tokens.write_bytes(bytes(data))
    elif damage == "cut-short":
        tokens.write_bytes(tokens.read_bytes()[:-200])
    elif damage == "bad-meta":
        meta.write_text("{not json")
    else:  # a store written before the record existed
        record = json.loads(meta.read_text())
        del record["checksum"]
        meta.write_text(json.dumps(record))
    (tmp_path / "cache" / ".tokenizer-x.json.tmp-999999999").write_text("a killed write")
    capsys.readouterr()

    again = prepare_tokens(cfg.data, cfg.model.max_seq_len)
    err = capsys.readouterr().err
    assert "does not match its record" in err and "building it again" in err and err.count("\n") == 1
    assert np.array_equal(np.array(again.train), train) and np.array_equal(np.array(again.val), val)
    assert temp_files(tmp_path / "cache") == []
    prepare_tokens(cfg.data, cfg.model.max_seq_len)  # rebuilt: it matches its record now, silently
    assert capsys.readouterr().err == ""
