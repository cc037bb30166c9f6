"""What a finished (or running) run looks like to a person: `lmforge report` writes one self-contained HTML
page about a run directory, `lmforge runs` lists the runs under a folder with their main metric, best first.

The page needs nothing beside itself (CSS inline, plots as base64 PNG, no scripts, no outside links), so it can
be mailed or opened offline. Everything is read from the run directory's files; a file that is missing or
cut short leaves its section out rather than failing the page.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import io
import json
import math
import os
import struct
from pathlib import Path

import yaml

from lmforge.config import LOSS_OPTIONS, applies
from lmforge.errors import UserError
from lmforge.io import atomic_write
from lmforge.rundir import BASE_MODEL, read_selection
from lmforge.tasks import registry
from lmforge.train import trackers
from lmforge.train.tracking import METRICS, read_metrics

EXPECTED = "expected a run directory with config.yaml and metrics.jsonl"
# the trackers' folders hold copies of a run's config.yaml and metrics.jsonl (uploaded files), not runs
SKIP_DIRS = {"checkpoints", trackers.TB_DIR, trackers.WANDB_DIR, trackers.MLFLOW_STORE}
PPL_TASKS = ("clm", "mlm")  # their loss is a per-token cross-entropy, so exp(loss) is a perplexity
SAMPLES = 10


@dataclasses.dataclass
class RunInfo:
    path: Path
    task: str
    metric: str | None  # None: nothing evaluated yet
    value: float | None
    higher_is_better: bool
    steps: int
    modified: float  # seconds since the epoch


def _read(path: Path, parse=json.loads) -> dict:
    """A JSON (or YAML) mapping; {} when the file is missing, cut short or not a mapping."""
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _number(value) -> float | None:
    """A finite number, else None (an empty evaluation reports NaN)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _date(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M") if stamp else "-"


def run_info(run: Path, cfg: dict | None = None, rows: list[dict] | None = None) -> RunInfo:
    cfg = _read(run / "config.yaml", yaml.safe_load) if cfg is None else cfg
    rows = read_metrics(run / METRICS) if rows is None else rows
    task = str(cfg.get("task", "?"))
    steps = max((r["step"] for r in rows), default=0)
    modified = max((p.stat().st_mtime for p in (run / METRICS, run / "config.yaml") if p.exists()), default=0)
    selection = read_selection(run)  # what picked the best weights, written by the run itself
    metric, higher = selection["metric"], selection["higher_is_better"]
    # the final report on the best weights wins over the val rows; the loss stands in when the metric is absent
    summary = _read(run / selection["final_report"]) if selection["final_report"] else {}
    for name, up in ((metric, higher), ("loss", False)):
        val = [v for r in rows if r["split"] == "val" and (v := _number(r.get(name))) is not None]
        value = _number(summary.get(name))
        if value is None and val:
            value = max(val) if up else min(val)
        if value is not None:
            return RunInfo(run, task, name, value, up, steps, modified)
    return RunInfo(run, task, None, None, higher, steps, modified)


def _value_text(info: RunInfo) -> str:
    if info.value is None:
        return "-"
    ppl = f" (ppl {math.exp(min(info.value, 50)):.2f})" if info.metric == "loss" and info.task in PPL_TASKS else ""
    return f"{info.value:.4f}{ppl}"


def list_runs(root: Path) -> list[RunInfo]:
    root = Path(root)
    hint = f"train one with lmforge pretrain --log.run_dir {root / 'NAME'}, or name another folder"
    if not root.is_dir():
        raise UserError(f"{root}: no such folder; expected a folder of run directories ({hint})")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))  # no weights, caches
        if "config.yaml" in files and (cfg := _read(Path(folder) / "config.yaml", yaml.safe_load)).get("task"):
            found.append(run_info(Path(folder), cfg))
    if not found:
        raise UserError(f"{root}: no run directories (folders with a config.yaml) in it; {hint}")
    return found


def format_runs(rows: list[RunInfo]) -> str:
    """An aligned table grouped by task; within a task the best run first, runs without a metric last."""
    def order(r: RunInfo):
        value = r.value or 0.0
        return r.task, r.value is None, r.metric or "", -value if r.higher_is_better else value

    table, last = [("TASK", "METRIC", "VALUE", "STEPS", "MODIFIED", "RUN")], None
    for r in sorted(rows, key=order):
        if last is not None and r.task != last:
            table.append(None)  # a blank line between tasks
        last = r.task
        best = "" if r.metric is None else " (max)" if r.higher_is_better else " (min)"  # which way is better
        table.append((r.task, f"{r.metric or 'not evaluated yet'}{best}", _value_text(r), str(r.steps),
                      _date(r.modified), str(r.path)))
    widths = [max(len(t[i]) for t in table if t) for i in range(6)]
    right = {2, 3}  # numbers right-aligned
    return "\n".join("" if t is None else "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                                       for i, (c, w) in enumerate(zip(t, widths))).rstrip()
                     for t in table)


# -- the HTML page ------------------------------------------------------------------------------------------

CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;padding:0 16px;color:#222}
h1{font-size:22px;margin:0 0 8px}h2{font-size:18px;border-bottom:1px solid #ddd;margin-top:28px}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}
caption{font-weight:600;text-align:left;padding:2px 0}.muted{color:#777}
.row{display:flex;flex-wrap:wrap;gap:0 28px;align-items:flex-start}.row img{max-width:440px}
.config{columns:3 340px;column-gap:16px}.config table{break-inside:avoid;width:100%;font-size:12px;table-layout:fixed}
.config td{overflow-wrap:anywhere}"""


def _e(value) -> str:
    return html.escape(str(value))


def _cell(value) -> str:
    if isinstance(value, float):
        return f'<td class="n">{value:.4f}</td>'
    return f'<td class="n">{value}</td>' if isinstance(value, int) else f"<td>{_e(value)}</td>"


def _table(header: list[str] | None, rows: list[list], caption: str = "") -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table>{f'<caption>{_e(caption)}</caption>' if caption else ''}{head}{body}</table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _curves(rows: list[dict], metric: str) -> bytes | None:
    """Loss, learning rate, throughput and the val selection metric, one panel each (2 x 2)."""
    train, val = [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "val"]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    # (rows, key, label, colour): train in matplotlib's first colour (C0, blue), val in its second (C1, orange)
    panels = {"loss": [(train, "loss", "train", "C0"), (val, "loss", "val", "C1")],
              "learning rate": [(train, "lr", "lr", "C2")], "throughput (tokens/s)": [(train, "tok_s", "tok/s", "C0")],
              f"val {metric}": [(val, metric, metric, "C1")] if metric != "loss" else []}
    for ax, (title, lines) in zip(axes.flat, panels.items()):
        for rs, key, label, colour in lines:
            points = [(r["step"], r[key]) for r in rs if key in r]
            if points:
                ax.plot(*zip(*points), "o-" if rs is val else "-", color=colour, lw=1.5, ms=4, label=label)
        if not ax.lines:
            ax.set_axis_off()
            continue
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
        if len(ax.lines) > 1:
            ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", ", ".join(map(str, value)) if isinstance(value, list) else value))
    return out


def _params(run: Path) -> str:
    """The stored parameter count from the safetensors header (8-byte length, then JSON): no weights are
    read. A PEFT run stores what trained only, and names its base."""
    try:
        with open(run / "model.safetensors", "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    except (OSError, ValueError, struct.error):
        return "-"
    count = f"{sum(math.prod(t['shape']) for k, t in header.items() if k != '__metadata__'):,}"
    base = (header.get("__metadata__") or {}).get(BASE_MODEL)
    return f"{count} trained, on the base {base}" if base else count


def _evaluation(title: str, report: dict, labels: list[str], picture: str = "") -> str:
    """A report of evaluate/finish: its summary numbers, per-class (or per-type) rows and confusion matrix."""
    parts = [_table(["metric", "value"], [[k, v] for k, v in report.items()
                                          if k != "report" and isinstance(v, (int, float, str))], "summary")]
    per = report.get("per_class") or report.get("per_type")
    if isinstance(per, dict) and per:
        cols = list(next(iter(per.values())))
        parts.append(_table(["class" if "per_class" in report else "type", *cols],
                            [[name, *(row.get(c, "") for c in cols)] for name, row in per.items()],
                            "per class" if "per_class" in report else "per entity type"))
    elif report.get("report"):
        parts.append(f"<pre>{_e(report['report'])}</pre>")
    matrix = report.get("confusion")
    if isinstance(matrix, list) and matrix:
        names = labels if len(labels) == len(matrix) else [str(i) for i in range(len(matrix))]
        head = "<tr><th>gold \\ predicted</th>" + "".join(f"<th>{_e(n)}</th>" for n in names) + "</tr>"
        body = ""
        for name, row in zip(names, matrix):  # shade each cell by its share of the gold row
            total = max(sum(row), 1)
            cells = (f'<td class="n" style="background:rgba(31,119,180,{0.85 * c / total:.2f})">{c}</td>' for c in row)
            body += f"<tr><th>{_e(name)}</th>{''.join(cells)}</tr>"
        parts.append(f'<table class="confusion"><caption>confusion matrix</caption>{head}{body}</table>')
    return f"<h3>{_e(title)}</h3>\n<div class=\"row\">{''.join(parts)}{picture}</div>"


def _dev_pairs(cfg: dict, run: Path, n: int):
    """The dev pairs the hypotheses translate, when their files can still be read (paths as given at training
    time, relative to where it ran, else to the run); None when they are gone or no longer line up."""
    from lmforge.data.parallel import read_parallel

    sc = cfg.get("seq2seq") or {}
    locate = lambda p: next((c for c in (Path(p), run / p) if c.is_file()), Path(p)) if p else None  # noqa: E731
    try:
        pairs = read_parallel(locate(sc["dev"]), locate(sc.get("dev_target")))
    except (UserError, KeyError, TypeError, OSError):
        return None
    return pairs if len(pairs) == n else None


def _translations(run: Path, cfg: dict) -> str:
    scores = _read(run / "dev_scores.json")
    parts = []
    if scores:
        sigs = scores.get("signatures") or {}
        parts.append(_table(["score", "value", "sacrebleu signature"],
                            [[k, v, sigs.get(k, "")] for k, v in scores.items() if isinstance(v, (int, float))],
                            "dev scores"))
    try:
        hyps = (run / "dev.translations.txt").read_text(encoding="utf-8").splitlines()
    except OSError:
        hyps = []
    if hyps:
        pairs = _dev_pairs(cfg, run, len(hyps))
        picks = sorted({round(i * (len(hyps) - 1) / max(SAMPLES - 1, 1)) for i in range(min(SAMPLES, len(hyps)))})
        if pairs:
            rows = [[pairs[i].line, pairs[i].source, pairs[i].target, hyps[i]] for i in picks]
            parts.append(_table(["dev line", "source", "reference", "hypothesis"], rows, "sample translations"))
        else:
            parts.append('<p class="muted">the dev files are not readable any more: hypotheses only</p>')
            parts.append(_table(["dev line", "hypothesis"], [[i + 1, hyps[i]] for i in picks], "sample translations"))
    return "<h2>Translation</h2>\n" + "\n".join(parts) if parts else ""


def _config_tables(cfg: dict) -> list[str]:
    """The config, one small table per top-level section set in columns, with only the keys that apply to the
    run's task (a fine-tuning run's page has no seq2seq or mlm options; config.yaml keeps them all)."""
    task = cfg.get("task")
    known = isinstance(task, str) and task in registry.TASKS
    loss = (cfg.get("loss") or {}).get("name") if isinstance(cfg.get("loss"), dict) else None
    loss = loss if loss in LOSS_OPTIONS else None
    sections = {}
    for key, value in _flatten(cfg):
        if known and not applies(key, task, loss):
            continue
        text = "null" if value is None else str(value)  # a string: numbers as given, not rounded to 4 places
        sections.setdefault(key.split(".")[0], []).append([key, text])
    note = (f'<p class="muted">the options of task {_e(task)}; config.yaml holds every key</p>' if known else "")
    return ["<h2>Config</h2>", note, '<div class="config">',
            *(_table(None, items, name) for name, items in sections.items()), "</div>"]


def _render(run: Path) -> str:
    cfg, rows = _read(run / "config.yaml", yaml.safe_load), read_metrics(run / METRICS)
    info = run_info(run, cfg, rows)
    labels = _read(run / "labels.json").get("labels") or []
    params = _params(run)
    head = [["run", str(run.resolve())], ["task", info.task],
            ["main metric", f"{info.metric} = {_value_text(info)}" if info.metric
             else "not evaluated yet" if rows else "no metrics yet"],
            ["steps", info.steps], ["parameters", params],
            ["modified", _date(info.modified)]]
    body = [f"<h1>{_e(run.resolve().name)}</h1>", _table(None, head), "<h2>Curves</h2>"]
    png = _curves(rows, info.metric or "loss")
    body.append(_img(png, "training curves") if png else '<p class="muted">no metrics yet</p>')
    reports = [("dev set (dev_report.json)", run / "dev_report.json"),
               *((f"{p.name}", p) for p in sorted(run.glob("eval_*.json")))]
    # confusion.png (drawn by training or `evaluate --confusion`) goes beside the first report's tables
    png_path = run / "confusion.png"
    picture = _img(png_path.read_bytes(), "confusion matrix") if png_path.is_file() else ""
    evals = []
    for title, data in ((t, d) for t, p in reports if (d := _read(p))):
        evals.append(_evaluation(title, data, labels, "" if evals else picture))
    if picture and not evals:
        evals.append(picture)
    if evals:
        body += ["<h2>Evaluation</h2>", *evals]
    body.append(_translations(run, cfg))
    body += _config_tables(cfg)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(run.name)} - lmforge report'
            f"</title><style>{CSS}</style></head><body>\n" + "\n".join(b for b in body if b) + "\n</body></html>\n")


def write_report(run: Path, out: Path | None = None) -> Path:
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run}: {'no config.yaml' if run.is_dir() else 'no such directory'}; {EXPECTED}")
    out = Path(out) if out else run / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    page = _render(run)
    atomic_write(out, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return out
