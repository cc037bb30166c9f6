"""docs/architecture.md's "Adding a task", followed: tests/toy_task.py is one module, SPEC its registry
entry. Registered from here, the task trains, evaluates, predicts, is served and reported by the same
commands as lmforge's own, with no other module changed."""

from __future__ import annotations

import json

import pytest
import yaml
from fastapi.testclient import TestClient

import toy_task
from helpers import classify_files, finetune, make_base, write_lines
from lmforge.cli import main
from lmforge.config import ServeLimits
from lmforge.report import format_runs, list_runs, write_report
from lmforge.serve import Engine, create_app
from lmforge.tasks import registry


@pytest.fixture
def polarity():
    registry.register(toy_task.SPEC)
    yield toy_task.SPEC
    registry.unregister(toy_task.SPEC.name)


@pytest.mark.slow  # a fine-tuning run
def test_a_task_registered_from_outside_trains_evaluates_predicts_and_is_served(tmp_path, polarity, capsys):
    encoder = make_base(tmp_path / "encoder", "mlm")
    train, dev = classify_files(tmp_path)
    run = finetune(tmp_path, encoder, train, dev, "polarity")

    # trained, and its own metric picked the best weights and was written beside them
    assert json.loads((run / "selection.json").read_text()) == {
        "metric": "balanced_accuracy", "higher_is_better": True, "final_report": "dev_report.json"}
    report = json.loads((run / "dev_report.json").read_text())
    assert report["balanced_accuracy"] >= 0.85, report  # a majority-class guess scores 0.5
    assert yaml.safe_load((run / "config.yaml").read_text())["finetune"]["labels"] == ["neg", "pos"]

    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(dev), "--device", "cpu"]) == 0
    result = capsys.readouterr().out.strip().splitlines()[-1]
    assert result.startswith("RESULT balanced_accuracy=") and "accuracy=" in result

    inputs = write_lines(tmp_path / "in.tsv", ["text", "the good lord", "the rome and queen"])
    out = tmp_path / "pred.jsonl"
    assert main(["predict", "--checkpoint", str(run), "--input", str(inputs), "--output", str(out), "--device", "cpu"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in records] == ["pos", "neg"]

    # served by the registry's endpoint: the server's answers are `lmforge predict`'s
    app = create_app(Engine(str(run), "cpu", ServeLimits()))
    with TestClient(app) as client:
        answer = client.post("/v1/classify", json={"inputs": ["the good lord", "the rome and queen"]})
        assert answer.json() == {"results": records}
        assert client.get("/metadata").json()["task"] == "polarity"

    # reported by its selection metric, read from the run directory
    assert write_report(run).is_file()
    [info] = [r for r in list_runs(tmp_path) if r.path == run]
    assert (info.task, info.metric, info.value) == ("polarity", "balanced_accuracy", report["balanced_accuracy"])
    assert "polarity" in format_runs([info])


def test_an_unregistered_task_is_a_config_error(tmp_path, capsys):
    assert main(["finetune", "--task", "polarity", "--log.run_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "task = polarity is not a fine-tuning task" in err and "classify" in err and "\n" not in err.strip()
