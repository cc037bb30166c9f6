"""log.trackers: a tiny real run fed to TensorBoard, W&B (offline) and MLflow (a local file store), each read back
with its own library and compared with metrics.jsonl and config.yaml; the config key and its deprecated
log.tensorboard alias; and the refusals (unknown tracker, missing library, a store that cannot be reached or
written) as one line, exit 2, before any run directory exists."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from helpers import free_port, read_metrics, synthetic_text, tiny_overrides, write_corpus
from test_cli_errors import check, full_argv, setup_files, snapshot

from lmforge.config import ConfigError, load_config, save_config
from lmforge.rundir import read_run_config
from lmforge.train import trackers


# -- the config key --------------------------------------------------------------------------------


def test_trackers_default_choices_and_repeats():
    assert load_config().log.trackers == ["tensorboard"]
    assert load_config(overrides={"log.trackers": "wandb,mlflow"}).log.trackers == ["wandb", "mlflow"]
    assert load_config(overrides={"log.trackers": "[]"}).log.trackers == []
    with pytest.raises(ConfigError, match=r"log.trackers\[1\] = 'neptune': expected one of tensorboard, wandb, mlflow"):
        load_config(overrides={"log.trackers": "[wandb, neptune]"})
    with pytest.raises(ConfigError, match="log.trackers = .*without repeats"):
        load_config(overrides={"log.trackers": "[wandb, wandb]"})
    with pytest.raises(ConfigError, match="log.wandb_mode = 'cloud'"):
        load_config(overrides={"log.wandb_mode": "cloud"})


def test_log_tensorboard_is_a_deprecated_alias(capsys):
    assert load_config(overrides={"log.tensorboard": "false"}).log.trackers == []
    assert "log.tensorboard is deprecated; use log.trackers" in capsys.readouterr().err
    cfg = load_config(overrides={"log.tensorboard": "false", "log.trackers": "[tensorboard, mlflow]"})
    assert cfg.log.trackers == ["mlflow"]
    cfg = load_config(base={"log": {"tensorboard": True, "trackers": ["wandb"]}})
    assert cfg.log.trackers == ["wandb", "tensorboard"]
    assert "tensorboard" not in cfg.log.__dict__  # the resolved config holds log.trackers alone


def test_the_command_takes_log_tensorboard_unlisted(capsys):
    from lmforge.cli import _overrides, build_parser

    parser = build_parser()
    args = parser.parse_args(["pretrain", "--log.tensorboard", "false", "--log.trackers", "[mlflow, tensorboard]"])
    assert load_config(overrides=_overrides(args)).log.trackers == ["mlflow"]
    assert "log.tensorboard is deprecated" in capsys.readouterr().err
    assert "--log.tensorboard" not in parser._subparsers._group_actions[0].choices["pretrain"].format_help()


def test_an_old_run_config_reads_quietly(tmp_path, capsys):
    """A run written before log.trackers has log.tensorboard in its config.yaml: it loads (resume, predict, export)
    without a note, its switch carried into log.trackers."""
    cfg = load_config(overrides={"model.vocab_size": 64})
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text(text.replace("  trackers:\n  - tensorboard\n", "  tensorboard: false\n"))
    tree = read_run_config(tmp_path)
    assert load_config(base=tree).log.trackers == []
    assert capsys.readouterr().err == ""


def test_params_are_every_config_leaf_flat():
    cfg = load_config(overrides={"train.lr_scale": "head.*=2", "model.d_model": "48", "model.n_head": "4"})
    flat = trackers.params(cfg)
    assert flat["model.d_model"] == 48 and flat["train.lr_scale"] == {"head.*": 2.0}
    assert flat["log.trackers"] == ["tensorboard"] and flat["task"] == "clm"
    from lmforge.config import leaves
    assert list(flat) == [p for p, _, _ in leaves()]


# -- a run read back by each tracker's own library ------------------------------------------------------------


def read_wandb_records(path: Path) -> list:
    """The records of an offline W&B run's .wandb file, parsed with wandb's own protobuf schema (wandb.proto).
    Written by hand because wandb 0.31 no longer ships a Python reader (its datastore moved into the Go core):
    the file is a 7-byte header (":W&B", magic 0xBEE1, version 0) and LevelDB log framing in 32 KiB blocks,
    each chunk a CRC-32 of its type byte and data, its length and its type (full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00"
    block, i, pending, records = 32768, 7, b"", []
    while i + 7 <= len(data):
        if block - i % block < 7:  # a block's tail too short for a chunk header is padding
            i += block - i % block
            continue
        crc, n, kind = struct.unpack("<IHB", data[i:i + 7])
        chunk = data[i + 7:i + 7 + n]
        i += 7 + n
        if kind == 0:
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc  # a misread chunk fails here
        pending += chunk
        if kind in (1, 4):  # full, last
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def items(update) -> dict:
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in update}


def expected_history(rows: list[dict]) -> dict[int, dict]:
    """metrics.jsonl as the trackers see it: per step, split/name -> value."""
    steps: dict[int, dict] = {}
    for row in rows:
        steps.setdefault(row["step"], {}).update({f"{row['split']}/{k}": v for k, v in row.items()
                                                  if k not in ("step", "split")})
    return steps


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    from lmforge.cli import main

    tmp = tmp_path_factory.mktemp("tracked")
    corpus = write_corpus(tmp, synthetic_text(5000))
    over = tiny_overrides(tmp, corpus, **{"log.trackers": "[tensorboard, wandb, mlflow]", "eval.every": 2,
                                          "log.run_dir": str(tmp / "runs" / "tiny"), "log.log_weights": True})
    argv = ["pretrain", *[a for k, v in over.items() for a in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]]
    assert main(argv) == 0
    return tmp / "runs" / "tiny"


@pytest.mark.slow
def test_wandb_offline_run_holds_config_metrics_summary_and_files(tracked_run):
    run = tracked_run
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1  # inside the run directory, ready for `wandb sync`
    records = read_wandb_records(next(offline[0].glob("run-*.wandb")))
    by_kind: dict[str, list] = {}
    for r in records:
        by_kind.setdefault(r.WhichOneof("record_type"), []).append(r)
    (run_record,) = by_kind["run"]
    assert run_record.run.display_name == run.name and run_record.run.project == "lmforge"
    config = items(run_record.run.config.update)
    config.pop("_wandb")
    expected = trackers.params(load_config(base=read_run_config(run)))
    assert config == json.loads(json.dumps(expected))  # what W&B keeps is the JSON of the values

    rows = read_metrics(run)
    want = expected_history(rows)
    got = {}
    for r in by_kind["history"]:
        row = items(r.history.item)
        got[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
    assert got == want  # every step, every metric, the same floats

    summary = {}
    for r in by_kind["summary"]:
        summary.update(items(r.summary.update))
    last = want[max(want)]
    assert {k: summary[k] for k in last} == last
    saved = {f.path for r in by_kind["files"] for f in r.files.files}
    assert {"lmforge/config.yaml", "lmforge/metrics.jsonl", "lmforge/curves.png", "lmforge/model.safetensors"} <= saved
    assert (offline[0] / "files" / "lmforge" / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()
    assert by_kind["exit"][0].exit.exit_code == 0


@pytest.mark.slow
def test_mlflow_run_holds_params_metric_history_and_artifacts(tracked_run, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    run = tracked_run
    store = run.parent / trackers.MLFLOW_STORE  # the default: OUT_DIR/mlruns
    client = MlflowClient(store.resolve().as_uri())
    experiment = client.get_experiment_by_name("lmforge")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == run.name and found.info.status == "FINISHED"
    assert found.data.tags["lmforge.run_dir"] == str(run.resolve())
    expected = trackers.params(load_config(base=read_run_config(run)))
    assert found.data.params == {k: str(v) for k, v in expected.items()}

    want = expected_history(read_metrics(run))
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/tok_s", "val/loss", "val/ppl"):
        history = client.get_metric_history(found.info.run_id, key)
        assert [(m.step, m.value) for m in history] == [(s, m[key]) for s, m in sorted(want.items()) if key in m], key
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"config.yaml", "metrics.jsonl", "curves.png", "model.safetensors"} <= artifacts


@pytest.mark.slow
def test_tensorboard_and_the_run_list_beside_the_trackers(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lmforge.report import list_runs

    run = tracked_run
    events = EventAccumulator(str(run / trackers.TB_DIR))
    events.Reload()
    want = expected_history(read_metrics(run))
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == sorted(want)
    assert [e.value for e in scalars] == pytest.approx([want[e.step]["train/loss"] for e in scalars], rel=1e-6)  # float32
    # the MLflow store and W&B's folder hold copies of config.yaml: `lmforge runs` still sees one run
    assert [r.path for r in list_runs(run.parent)] == [run]


# -- refusals before the run directory exists ---------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    setup_files(tmp)
    return tmp


REFUSALS = [
    ("unknown-tracker", ["--log.trackers", "[wandb, comet]"], None, ["log.trackers[1] = 'comet'", "tensorboard, wandb, mlflow"]),
    ("wandb-missing", ["--log.trackers", "[wandb]"], "wandb", ["log.trackers has wandb", "pip install wandb",
                                                              "lmforge[trackers]"]),
    ("mlflow-missing", ["--log.trackers", "[mlflow]"], "mlflow", ["log.trackers has mlflow", "pip install mlflow-skinny"]),
    ("mlflow-server-down", ["--log.trackers", "[mlflow]", "--log.mlflow_uri", "http://127.0.0.1:PORT"], None,
     ["log.mlflow_uri = http://127.0.0.1:PORT", "cannot reach 127.0.0.1:PORT"]),
    ("mlflow-store-under-a-file", ["--log.trackers", "[mlflow]", "--log.mlflow_uri", "good.txt/store"], None,
     ["log.mlflow_uri = good.txt/store", "cannot write to", "good.txt"]),
    ("mlflow-store-is-a-file", ["--log.trackers", "[mlflow]", "--log.mlflow_uri", "file:good.txt"], None,
     ["log.mlflow_uri = file:good.txt", "is a file"]),
    ("mlflow-sqlite-without-sqlalchemy", ["--log.trackers", "[mlflow]", "--log.mlflow_uri", "sqlite:///m.db"],
     "sqlalchemy", ["log.mlflow_uri = sqlite:///m.db", "pip install mlflow"]),
]


@pytest.mark.parametrize("options, hidden, expected", [pytest.param(*c[1:], id=c[0]) for c in REFUSALS])
def test_tracker_refusals(workdir, tmp_path, monkeypatch, capsys, options, hidden, expected):
    """In process, a library made missing by a None in sys.modules (Python's own way to block an import)."""
    from lmforge.cli import main

    port = str(free_port())  # nothing listens there
    options = [o.replace("PORT", port) for o in options]
    expected = [e.replace("PORT", port) for e in expected]
    if hidden:
        monkeypatch.setitem(sys.modules, hidden, None)
    before, busy = snapshot(workdir)
    monkeypatch.chdir(workdir)
    rc = main(full_argv(["pretrain", *options], tmp_path))
    out = capsys.readouterr()
    assert rc == 2
    check(workdir, tmp_path, before, busy, rc, out.out, out.err, expected)


@pytest.mark.slow
def test_missing_library_through_the_command(workdir, tmp_path):
    """The real command in a subprocess with no stdin, wandb blocked before lmforge starts."""
    before, busy = snapshot(workdir)
    argv = full_argv(["pretrain", "--log.trackers", "[tensorboard, wandb]"], tmp_path)
    code = f"import sys; sys.modules['wandb'] = None; from lmforge.cli import main; sys.exit(main({argv!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    check(workdir, tmp_path, before, busy, proc.returncode, proc.stdout, proc.stderr, ["pip install wandb"])


def test_wandb_online_without_credentials(workdir, tmp_path, monkeypatch, capsys):
    """Online W&B with no API key and no `wandb login`: refused up front, never a login prompt on stdin."""
    from lmforge.cli import main

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no W&B settings
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    before, busy = snapshot(workdir)
    monkeypatch.chdir(workdir)
    rc = main(full_argv(["pretrain", "--log.trackers", "[wandb]", "--log.wandb_mode", "online"], tmp_path))
    out = capsys.readouterr()
    assert rc == 2
    check(workdir, tmp_path, before, busy, rc, out.out, out.err,
          ["log.wandb_mode = online needs W&B credentials", "wandb login", "WANDB_API_KEY"])


# -- a tracker failing mid-run ------------------------------------------------------------------------


class Failing:
    def __init__(self, error: Exception):
        self.error, self.calls = error, 0

    def log(self, step, metrics):
        self.calls += 1
        raise self.error


def test_a_tracker_failing_mid_run_is_dropped_and_the_run_keeps_every_row(tmp_path, capsys):
    from lmforge.errors import UserError
    from lmforge.train.tracking import Tracker

    tracker = Tracker(tmp_path, load_config(overrides={"log.trackers": "[]", "log.progress": "false"}), 10, 0)
    broken = tracker.trackers["mlflow"] = Failing(ConnectionError("server gone"))
    tracker.log(1, "train", {"loss": 2.0, "lr": 1e-3, "tok_s": 10.0})
    tracker.log(2, "train", {"loss": 1.5, "lr": 1e-3, "tok_s": 10.0})
    assert broken.calls == 1 and "mlflow" not in tracker.trackers  # dropped after its first failure
    err = capsys.readouterr().err
    assert err.count("mlflow failed (ConnectionError: server gone); the run goes on") == 1
    tracker.trackers["wandb"] = Failing(UserError("disk full"))  # a user's (or the machine's) error stays fatal
    with pytest.raises(UserError, match="disk full"):
        tracker.log(3, "train", {"loss": 1.0, "lr": 1e-3, "tok_s": 10.0})
    tracker.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
