"""Answers that need no model come without importing torch (seconds on a cold start): `lmforge runs`, `--help`,
and the refusal of a run of the wrong kind, read from its config.yaml before the model loads. Each command
runs in a fresh Python, which then says whether torch was imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lmforge
from helpers import make_base

SOURCE = str(Path(lmforge.__file__).resolve().parents[1])  # the lmforge under test, wherever the command runs

# `lmforge ARGV` in this interpreter, then a last line of its own: the exit status and whether torch was imported
DRIVER = """
import json, sys
from lmforge.cli import main
try:
    code = main(json.loads(sys.argv[1]))
except SystemExit as e:  # --help exits from argparse
    code = e.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


def lmforge_alone(*argv) -> tuple[dict, str, str]:
    """({"code", "torch"}, stdout without that last line, stderr) of `lmforge ARGV` in a fresh Python."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [SOURCE, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([str(a) for a in argv])], capture_output=True,
                          text=True, env=env, stdin=subprocess.DEVNULL, timeout=300)
    *out, last = proc.stdout.strip().splitlines() or [""]
    assert last.startswith("{"), proc.stderr[-2000:]
    return json.loads(last), "\n".join(out), proc.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    make_base(root / "clm", "clm")
    make_base(root / "mlm", "mlm", specials=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    make_base(root / "cls", "classify", sections={"finetune": {"labels": ["neg", "pos"], "body": "decoder",
                                                               "pooling": "last"}})
    return root


@pytest.mark.parametrize("argv", [["--help"], ["pretrain", "--help"], ["predict", "--help"],
                                  ["finetune", "--task", "tag", "--help"], ["finetune", "--help", "all"]])
def test_help_needs_no_torch(argv):
    result, out, _ = lmforge_alone(*argv)
    assert result == {"code": 0, "torch": False} and out.startswith("usage: lmforge")


def test_listing_the_runs_needs_no_torch(runs):
    result, out, _ = lmforge_alone("runs", runs)
    assert result == {"code": 0, "torch": False}
    assert str(runs / "clm") in out and str(runs / "cls") in out


@pytest.mark.parametrize("argv, expected", [
    (["predict", "--checkpoint", "{clm}", "--input", "in.tsv"], "predict: {clm} holds a clm model; predict takes a "
                                                                "fine-tuned run"),
    (["evaluate", "--checkpoint", "{clm}/model.safetensors", "--data", "dev.tsv"],
     "evaluate: {clm}/model.safetensors holds a clm model"),
    (["translate", "--checkpoint", "{clm}"], "translate: {clm} holds a clm model; expected a seq2seq run"),
    (["generate", "--checkpoint", "{cls}", "--prompt", "hi"], "generate: {cls} holds a model of task classify"),
    (["serve", "{mlm}"], "serve: {mlm} holds a mlm model, which answers no requests"),
    (["export", "{mlm}", "{out}", "--format", "llama"], "export: {mlm}: the model fits no Hugging Face layout "
                                                        "lmforge writes: Llama needs task = clm (it is mlm)"),
    (["export", "{cls}", "{out}", "--merge"], "export: --merge: {cls} has no LoRA adapter to merge"),
])
def test_a_run_of_the_wrong_kind_is_refused_before_torch_loads(runs, argv, expected):
    where = {"clm": runs / "clm", "cls": runs / "cls", "mlm": runs / "mlm", "out": runs / "out"}
    result, out, err = lmforge_alone(*(a.format(**where) for a in argv))
    assert result == {"code": 2, "torch": False}
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lmforge: error: {expected.format(**where)}"), err
    assert not where["out"].exists()


def test_an_old_runs_log_tensorboard_is_upgraded_quietly_before_loading(runs):
    """A run written before log.trackers: the export check reads it as load_run does, with no deprecation note."""
    import yaml

    from lmforge.rundir import config_before_loading

    old = runs / "old"
    old.mkdir()
    tree = yaml.safe_load((runs / "clm" / "config.yaml").read_text())
    tree["log"].pop("trackers")
    tree["log"]["tensorboard"] = False
    tree["train"].pop("schedule_steps", None)
    (old / "config.yaml").write_text(yaml.safe_dump(tree))
    result, _, err = lmforge_alone("export", old, runs / "old-out", "--format", "bert")
    assert result == {"code": 2, "torch": False} and "deprecated" not in err and "needs task = mlm" in err
    cfg = config_before_loading(old)
    assert cfg.log.trackers == [] and cfg.train.schedule_steps == cfg.train.max_steps
