"""What a run reports: a progress bar, metrics.jsonl, the experiment trackers of log.trackers (TensorBoard,
W&B, MLflow: train/trackers.py), and a PNG of the loss and learning-rate curves at the end. Every logged row goes
to metrics.jsonl and to each tracker from `Tracker.log`, the one place."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from lmforge.errors import UserError, one_line
from lmforge.io import atomic_write, writing
from lmforge.train import trackers

METRICS = "metrics.jsonl"
PLOT = "curves.png"


class Tracker:
    def __init__(self, run_dir: Path, cfg, max_steps: int, start_step: int):
        self.run_dir, self.lc = run_dir, cfg.log
        self.path = run_dir / METRICS
        # On resume keep the history up to the checkpoint and drop what a crashed run logged after it.
        kept = [r for r in read_metrics(self.path) if r["step"] <= start_step] if start_step else []
        with writing(self.path):  # a full or read-only disk is one line naming the file, here and in log()
            self.file = open(self.path, "w", encoding="utf-8")
            for r in kept:
                self.file.write(json.dumps(r) + "\n")
        self.trackers = trackers.start(run_dir, cfg, start_step)
        interactive = self.lc.progress and sys.stderr.isatty()
        self.bar = tqdm(total=max_steps, initial=start_step, disable=not interactive, dynamic_ncols=True,
                        unit="step", file=sys.stderr)
        self.plain = self.lc.progress and not interactive  # logs and CI get a line per log interval instead

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        row = {"step": step, "split": split, **metrics}
        with writing(self.path):
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        self._each_tracker("log", step, {f"{split}/{k}": v for k, v in metrics.items()})
        if split == "train":
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                 tok_s=f"{metrics['tok_s']:.0f}", refresh=False)
        text = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        if split != "train":
            self.bar.write(f"step {step} {split}: {text}")
        elif self.plain:
            print(f"step {step}: {text}", flush=True)

    def _each_tracker(self, method: str, *args) -> None:
        """Call `method` on every tracker. A tracker that fails mid-run (a server gone, a library's error) is
        dropped with a warning: the run goes on, and metrics.jsonl keeps every row. A full disk stays fatal."""
        for name, tracker in list(self.trackers.items()):
            try:
                getattr(tracker, method)(*args)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - any library error; the run matters more than one tracker
                del self.trackers[name]
                self.bar.write(f"lmforge: warning: {name} failed ({type(e).__name__}: {one_line(e)}); the run goes on "
                               f"without it (metrics.jsonl has every row)", file=sys.stderr)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def close(self, schedule: list[float] | None = None, metric: str = "loss") -> Path | None:
        """Finish; `schedule` is the planned learning rate of every step, drawn under the logged one;
        `metric` (other than loss): the val metric the run selects by, drawn in a third panel."""
        self.bar.close()
        with writing(self.path):
            self.file.close()
        return plot_curves(self.run_dir, schedule, metric)

    def end(self, ok: bool = True) -> list[str]:
        """After close and the task's final report: upload the run's files to the trackers and finish them (a
        run that failed is marked so); the lines that say where each tracker's record is."""
        files = trackers.files_to_upload(self.run_dir, self.lc.log_weights)
        self._each_tracker("finish", files, ok)
        return [f"{name + ':':<14} {tracker.where()}" for name, tracker in self.trackers.items()]


class NullTracker:
    """The tracker of ranks other than 0: only rank 0 writes the run directory."""

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def close(self, schedule: list[float] | None = None, metric: str = "loss") -> None:
        return None

    def end(self, ok: bool = True) -> list[str]:
        return []


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line cut short by a crash mid-write is skipped, not fatal."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row and "split" in row:
            rows.append(row)
    return rows


def plot_curves(run_dir: Path, schedule: list[float] | None = None, metric: str = "loss") -> Path | None:
    rows = read_metrics(run_dir / METRICS)
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in val if metric in r] if metric != "loss" else []
    fig, axes = plt.subplots(1, 3 if scored else 2, figsize=(16 if scored else 11, 4))
    ax_loss, ax_lr = axes[0], axes[1]
    if scored:
        axes[2].plot([r["step"] for r in scored], [r[metric] for r in scored], "o-", color="tab:purple", lw=1.5)
        axes[2].set(xlabel="step", ylabel=metric, title=f"val {metric}")
        axes[2].grid(alpha=0.3)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if val:
        ax_loss.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val", lw=1.5)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    if schedule:  # logged step s ran at the schedule's value for the 0-based step s - 1
        ax_lr.plot(range(1, len(schedule) + 1), schedule, color="tab:gray", ls="--", lw=1, label="schedule")
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], "o", ms=2.5, color="tab:green", label="logged")
    ax_lr.legend()
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning-rate schedule")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    path = run_dir / PLOT
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path
