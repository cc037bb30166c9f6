"""`lmforge report` and `lmforge runs`: the HTML page of a real (tiny) classification and translation run is
self-contained, has its tables and plots, renders in a headless Chromium; the run list puts the best run
first; bad folders are one-line errors."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from lmforge.cli import main
from lmforge.report import format_runs, list_runs, write_report
from helpers import SEQ2SEQ_TINY, classify_files, finetune, make_base, number_pairs, write_tsv

C0, C1 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's first two line colours: train and val


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory) -> Path:
    """A real fine-tuned classifier (labels neg/pos) with dev_report.json, labels.json and confusion.png."""
    tmp = tmp_path_factory.mktemp("classify")
    train, dev = classify_files(tmp)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # module fixtures run before conftest's per-test chdir: keep relative defaults out of the repo
        return finetune(tmp, make_base(tmp / "base", "mlm"), train, dev, "classify", "--finetune.epochs", "4",
                        "--eval.every", "10")


@pytest.fixture(scope="module")
def translation_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("seq2seq")
    train = write_tsv(tmp / "train.tsv", number_pairs(300, 0))
    dev = write_tsv(tmp / "dev.tsv", number_pairs(20, 1))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        assert main(["train", "--task", "seq2seq", *SEQ2SEQ_TINY, "--seq2seq.train", str(train), "--seq2seq.dev", str(dev),
                     "--data.tokenizer.vocab_size", "120", "--train.max_steps", "20", "--train.warmup_steps", "2",
                     "--eval.every", "10", "--seq2seq.beam_size", "1", "--log.run_dir", str(tmp / "run")]) == 0
    return tmp / "run"


def images(page: str) -> list[Image.Image]:
    found = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in found]


def colour_pixels(image: Image.Image, colour: tuple[int, int, int], tol: int = 12) -> int:
    rgb = np.asarray(image.convert("RGB"), dtype=int)
    return int((np.abs(rgb - colour).max(axis=-1) <= tol).sum())


@pytest.mark.slow  # the module's classify_run: a fine-tuning run
def test_classification_report_is_one_self_contained_page(classify_run, tmp_path, capsys):
    out = tmp_path / "page" / "r.html"
    assert main(["report", str(classify_run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {out}"
    page = out.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page) and "<script" not in page
    assert page.count("<table") >= 5  # header, summary, per class, confusion, config sections
    assert "train.lr" in page and "finetune.metric" in page  # the config, with only the classify task's keys:
    assert "seq2seq.beam_size" not in page and "mlm.mask_prob" not in page and "model.n_layer" not in page
    assert "loss.label_smoothing" in page and "loss.beta" not in page  # cross_entropy's options, not dpo's
    assert "<th>neg</th>" in page and "<th>pos</th>" in page and "gold \\ predicted" in page  # confusion, named
    assert re.search(r"<td>accuracy</td><td class=\"n\">[01]\.\d{4}</td>", page)
    curves, confusion = images(page)  # the curves and confusion.png
    assert curves.width >= 800 and curves.height >= 500 and confusion.width >= 300
    assert colour_pixels(curves, C0) > 400 and colour_pixels(curves, C1) > 300  # train and val lines are drawn
    # the default place, and the function the CLI calls
    assert write_report(classify_run) == classify_run / "report.html" and (classify_run / "report.html").is_file()


@pytest.mark.slow  # the module's translation_run: 20 steps
def test_translation_report_shows_scores_and_samples_and_survives_lost_data(translation_run, tmp_path):
    page = write_report(translation_run, tmp_path / "a.html").read_text(encoding="utf-8")
    assert "nrefs:1|case:mixed|eff:no|tok:13a" in page and "<th>hypothesis</th>" in page
    dev = yaml.safe_load((translation_run / "config.yaml").read_text())["seq2seq"]["dev"]
    first_source = Path(dev).read_text(encoding="utf-8").splitlines()[0].split("\t")[0]
    assert f"<td>{first_source}</td>" in page  # source and reference beside the hypothesis
    assert len(images(page)) == 1
    Path(dev).unlink()  # the dev file is gone: hypotheses only, no failure
    page = write_report(translation_run, tmp_path / "b.html").read_text(encoding="utf-8")
    assert "hypotheses only" in page and f"<td>{first_source}</td>" not in page


def fake_run(root: Path, name: str, task: str, report: dict | None = None, val: list[dict] | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"task": task, "finetune": {"metric": "auto"}}))
    # what the training loop writes: the selection metric of the task (classify: accuracy) and its report file
    selection = (["accuracy", True, "dev_report.json"] if task == "classify" else ["loss", False, None])
    (run / "selection.json").write_text(json.dumps(dict(zip(["metric", "higher_is_better", "final_report"], selection))))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": 10 * (i + 1), "split": "val", **r}) + "\n"
                                               for i, r in enumerate(val or [])))
    if report is not None:
        (run / "dev_report.json").write_text(json.dumps(report))
    return run


def test_runs_lists_the_best_run_of_each_task_first(tmp_path, capsys):
    fake_run(tmp_path / "runs", "weak", "classify", {"accuracy": 0.61, "loss": 0.7})
    fake_run(tmp_path / "runs" / "deeper", "strong", "classify", {"accuracy": 0.93, "loss": 0.9})
    fake_run(tmp_path / "runs", "empty", "classify")
    fake_run(tmp_path / "runs", "lm_a", "clm", val=[{"loss": 3.0}, {"loss": 2.5}, {"loss": 2.7}])
    fake_run(tmp_path / "runs", "lm_b", "clm", val=[{"loss": 2.0}])
    (tmp_path / "runs" / "lm_b" / "checkpoints" / "x").mkdir(parents=True)  # not searched
    (tmp_path / "runs" / "lm_b" / "checkpoints" / "x" / "config.yaml").write_text("task: clm\n")
    assert main(["runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "" in out.splitlines()  # a blank line between the tasks
    lines = [line for line in out.splitlines()[1:] if line]
    assert [line.split()[-1].rsplit("/", 1)[-1] for line in lines] == ["strong", "weak", "empty", "lm_b", "lm_a"]
    assert "0.9300" in lines[0] and "(ppl 7.39)" in lines[3] and "(ppl 12.18)" in lines[4]  # lm_a: its best loss
    rows = list_runs(tmp_path / "runs")
    assert {(r.path.name, r.metric, r.higher_is_better, r.steps) for r in rows} >= {("weak", "accuracy", True, 0),
                                                                                    ("lm_a", "loss", False, 30)}
    assert format_runs(rows) + "\n" == out


@pytest.mark.parametrize("argv", [["runs", "{tmp}/nothing"], ["runs", "{tmp}/empty"], ["report", "{tmp}/empty"],
                                  ["report", "{tmp}/nothing"]])
def test_bad_folders_are_one_line_errors(tmp_path, capsys, argv):
    (tmp_path / "empty").mkdir()
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lmforge: error: {argv[1]}: ") and err.count("\n") == 1 and "Traceback" not in err
    assert ("lmforge pretrain" if argv[0] == "runs" else "expected a run directory with config.yaml") in err


def test_a_run_without_metrics_still_gets_a_page(tmp_path):
    page = write_report(fake_run(tmp_path, "new", "clm")).read_text(encoding="utf-8")
    assert "no metrics yet" in page and "data:image" not in page and "<caption>task</caption>" in page


def chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={tmp / 'profile'}", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(not shutil.which("chromium"), reason="chromium not installed (Debian: apt-get install chromium)")
@pytest.mark.slow  # a headless browser, and classify_run
def test_chromium_renders_the_plots_and_tables(classify_run, tmp_path):
    url = write_report(classify_run, tmp_path / "r.html").resolve().as_uri()
    shot = tmp_path / "shot.png"
    chromium("--window-size=1200,3000", f"--screenshot={shot}", url, tmp=tmp_path)
    image = Image.open(shot)
    assert image.size == (1200, 3000)
    assert colour_pixels(image, C0) > 400 and colour_pixels(image, C1) > 300  # the curves are on screen
    dom = chromium("--dump-dom", url, tmp=tmp_path).stdout
    assert dom.count("<table") >= 5 and dom.count("data:image/png;base64,") == 2 and "<th>pos</th>" in dom
