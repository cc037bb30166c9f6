"""Every config and data mistake, run through the real `lmforge` command in a subprocess: a non-zero
exit, exactly one line on stderr that starts with "lmforge: error:" and names the file, line or key,
no traceback, and no run directory left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import synthetic_text

# a tiny model, so that a case that wrongly got past its error would still finish quickly
TINY = ["--model.n_layer", "1", "--model.n_head", "2", "--model.d_model", "32", "--model.max_seq_len", "16",
        "--train.max_steps", "2", "--train.warmup_steps", "0", "--eval.batches", "1", "--log.progress", "false",
        "--log.trackers", "[]", "--log.samples", "0", "--data.tokenizer.kind", "char"]


def setup_files(tmp: Path) -> None:
    (tmp / "good.txt").write_text(synthetic_text(5000), encoding="utf-8")
    (tmp / "empty.txt").write_text("", encoding="utf-8")
    (tmp / "latin1.txt").write_bytes(b"first line is fine\nthe second is caf\xe9\nthird\n")
    (tmp / "short.txt").write_text("only a few words\n", encoding="utf-8")
    (tmp / "missing_field.jsonl").write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"body": "b"}) + "\n")
    (tmp / "malformed.jsonl").write_text(json.dumps({"text": "a"}) + "\n\n" + '{"text": "b",}\n')
    (tmp / "no_txt").mkdir()
    (tmp / "no_txt" / "readme.md").write_text("not a .txt file\n")
    (tmp / "bad_yaml.yaml").write_text("train:\n  lr: 0.1\n  batch_size: [1, 2\nmodel: {}\n")
    (tmp / "unknown_key.yaml").write_text("model:\n  n_layer: 2\n  d_modle: 64\n")
    (tmp / "busy_run" / "checkpoints").mkdir(parents=True)
    (tmp / "busy_run" / "checkpoints" / "step_00000002.pt").write_bytes(b"a checkpoint")  # a run that saved one
    (tmp / "busy_run" / "config.yaml").write_text("task: clm\n")


# (id, arguments after `lmforge`, what the error line must contain); each runs in a subprocess
CASES = [
    ("unknown-key", ["pretrain", "--train.lrr", "3"], ["--train.lrr", "did you mean --train.lr?"]),
    ("wrong-type", ["pretrain", "--train.batch_size", "lots"], ["train.batch_size = 'lots'", "expected an integer"]),
    ("out-of-range", ["pretrain", "--data.val_fraction", "1.5"], ["data.val_fraction = 1.5", "in (0, 1)"]),
    ("bad-choice", ["pretrain", "--model.pos", "alibi"], ["model.pos = 'alibi'", "learned, rope"]),
    ("missing-config", ["pretrain", "--config", "nope.yaml"], ["nope.yaml", "no such file"]),
    ("invalid-yaml", ["pretrain", "--config", "bad_yaml.yaml"], ["bad_yaml.yaml:", "not valid YAML"]),
    ("empty-corpus", ["pretrain", "--data.path", "empty.txt"], ["empty.txt", "empty"]),
    ("non-utf8-bpe", ["pretrain", "--data.path", "latin1.txt", "--data.tokenizer.kind", "bpe"], ["latin1.txt:2:", "UTF-8"]),
    ("jsonl-missing-field", ["pretrain", "--data.path", "missing_field.jsonl"],
     ["missing_field.jsonl:2:", "no field 'text'", "body", "data.text_field"]),
    ("jsonl-malformed", ["pretrain", "--data.path", "malformed.jsonl", "--data.tokenizer.kind", "wordpiece"],
     ["malformed.jsonl:3:", "not valid JSON"]),
    ("corpus-too-short", ["pretrain", "--data.path", "short.txt"], ["short.txt", "model.max_seq_len = 16"]),
    ("missing-data-path", ["pretrain", "--data.path", "nowhere.txt"], ["nowhere.txt", "no such file"]),
    ("folder-without-txt", ["pretrain", "--data.path", "no_txt"], ["no_txt", "no .txt files"]),
    ("resume-nothing", ["pretrain", "--resume", "auto"], ["--resume auto", "no run with checkpoints"]),
    ("run-dir-busy", ["pretrain", "--log.run_dir", "busy_run"], ["busy_run", "already holds a run", "--resume auto"]),
]

# more cases of the same kind, run in-process through cli.main (a subprocess costs seconds of torch import)
IN_PROCESS = [
    ("unknown-key-yaml", ["pretrain", "--config", "unknown_key.yaml"],
     ["unknown key 'model.d_modle'", "did you mean 'model.d_model'?"]),
    ("wrong-type-bool", ["pretrain", "--log.progress", "maybe"], ["log.progress = 'maybe'", "true or false"]),
    ("missing-value", ["pretrain", "--train.lr"], ["pretrain: argument --train.lr: expected one argument"]),
    ("cross-field", ["pretrain", "--train.lr", "1e-4", "--train.min_lr", "1e-3"],
     ["train.min_lr = 0.001", "train.lr = 0.0001"]),
    ("non-utf8-char", ["pretrain", "--data.path", "latin1.txt"], ["latin1.txt:2:", "UTF-8"]),
    ("missing-tokenizer", ["pretrain", "--data.tokenizer.path", "nowhere.json"], ["nowhere.json", "no such file"]),
    ("resume-missing-dir", ["pretrain", "--resume", "gone_run"], ["gone_run", "no such run directory"]),
    ("resume-empty-run", ["pretrain", "--resume", "no_txt"], ["no_txt", "no readable checkpoint"]),
    ("generate-not-a-run", ["generate", "--checkpoint", "no_txt"], ["no_txt", "not a run directory"]),
    ("generate-bad-device", ["generate", "--checkpoint", "no_txt", "--device", "gpu"], ["--device = 'gpu'", "cuda:N"]),
    pytest.param(["pretrain", "--train.device", "cuda"], ["train.device = cuda", "no CUDA device"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"), id="no-cuda"),
    ("unknown-precision", ["pretrain", "--train.precision", "fp8"], ["train.precision = 'fp8'", "auto, fp32, bf16, fp16"]),
    ("fp16-on-cpu", ["pretrain", "--train.device", "cpu", "--train.precision", "fp16"],
     ["train.precision = fp16 on cpu", "CUDA only", "auto, bf16 or fp32"]),
    ("tokenizer-missing-input", ["tokenizer", "train", "--input", "nowhere.txt", "--out", "tok"], ["nowhere.txt"]),
    ("unknown-optimizer", ["pretrain", "--train.optimizer", "lion"], ["train.optimizer = 'lion'", "adamw, adam, sgd"]),
    ("unknown-schedule", ["pretrain", "--train.schedule", "step"], ["train.schedule = 'step'", "wsd, inverse_sqrt"]),
    ("unknown-loss", ["pretrain", "--loss.name", "kl"], ["loss.name = 'kl'", "cross_entropy, focal"]),
    ("loss-wrong-for-task", ["pretrain", "--loss.name", "mse"], ["loss.name = mse", "clm task trains with cross_entropy"]),
    ("loss-option-not-taken", ["pretrain", "--loss.delta", "2"],
     ["loss.delta = 2.0 does not apply to loss.name = cross_entropy", "loss.label_smoothing"]),
    ("label-smoothing-range", ["pretrain", "--loss.label_smoothing", "1.5"], ["loss.label_smoothing = 1.5", "in [0, 1]"]),
    ("class-weights-not-numbers", ["pretrain", "--loss.class_weights", "1,x"], ["loss.class_weights[1] = 'x'", "a number"]),
    ("clm-class-weights", ["pretrain", "--loss.class_weights", "1,2"], ["loss.class_weights", "clm task takes no class"]),
    ("lr-scale-malformed", ["pretrain", "--train.lr_scale", "head.*"], ["train.lr_scale = 'head.*'", "key=value"]),
    ("lr-scale-not-number", ["pretrain", "--train.lr_scale", "head.*=big"], ["train.lr_scale.head.* = 'big'", "a number"]),
    ("nesterov-without-momentum", ["pretrain", "--train.optimizer", "sgd", "--train.nesterov", "true",
                                   "--train.momentum", "0"], ["train.nesterov", "train.momentum > 0"]),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    setup_files(tmp)
    return tmp


def full_argv(argv, case: Path) -> list[str]:
    extra = []
    if argv[0] == "pretrain":
        extra = TINY + ["--data.cache_dir", str(case / "cache"), "--log.out_dir", str(case / "runs")]
        if "--data.path" not in argv:
            extra += ["--data.path", "good.txt"]
    return [argv[0], *extra, *argv[1:]]  # the case's own options come last, so they win


def check(workdir, case, before, busy, rc, stdout, stderr, expected):
    assert rc != 0, stdout
    assert "Traceback" not in stderr + stdout
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("lmforge: error: ")
    for text in expected:
        assert text in lines[0]
    assert not (case / "runs").exists()
    assert not (workdir / "runs").exists() and not (workdir / "gone_run").exists()
    assert sorted(p.name for p in (workdir / "busy_run").rglob("*")) == busy  # nothing written into the old run
    assert sorted(p.name for p in workdir.iterdir()) == before


def snapshot(workdir):
    return sorted(p.name for p in workdir.iterdir()), sorted(p.name for p in (workdir / "busy_run").rglob("*"))


# A subprocess that imports torch costs seconds here: those cases are the slow tier. The cases named here
# are refused by argparse before torch is imported, so the fast tier keeps a real `python -m lmforge` run.
BEFORE_TORCH = {"unknown-key"}


@pytest.mark.parametrize("argv, expected", [
    pytest.param(*c[1:], id=c[0], marks=() if c[0] in BEFORE_TORCH else pytest.mark.slow) for c in CASES])
def test_cli_error(workdir, tmp_path, argv, expected):
    before, busy = snapshot(workdir)
    env = dict(os.environ)  # LMFORGE_CACHE: the session's fixed device facts (conftest)
    proc = subprocess.run([sys.executable, "-m", "lmforge", *full_argv(argv, tmp_path)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=120)
    check(workdir, tmp_path, before, busy, proc.returncode, proc.stdout, proc.stderr, expected)


@pytest.mark.parametrize("argv, expected", [c if hasattr(c, "values") else pytest.param(*c[1:], id=c[0])
                                            for c in IN_PROCESS])
def test_cli_error_in_process(workdir, tmp_path, monkeypatch, capsys, argv, expected):
    from lmforge.cli import main

    before, busy = snapshot(workdir)
    monkeypatch.chdir(workdir)
    rc = main(full_argv(argv, tmp_path))
    out = capsys.readouterr()
    check(workdir, tmp_path, before, busy, rc, out.out, out.err, expected)
