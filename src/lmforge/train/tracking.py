"""What a run reports: a progress bar, metrics.jsonl, TensorBoard event files, and a PNG of the
loss and learning-rate curves at the end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from lmforge.io import atomic_write, writing

METRICS = "metrics.jsonl"
PLOT = "curves.png"
TB_DIR = "tensorboard"


class Tracker:
    def __init__(self, run_dir: Path, lc, max_steps: int, start_step: int):
        self.run_dir, self.lc = run_dir, lc
        self.path = run_dir / METRICS
        # On resume keep the history up to the checkpoint and drop what a crashed run logged after it.
        kept = [r for r in read_metrics(self.path) if r["step"] <= start_step] if start_step else []
        with writing(self.path):  # a full or read-only disk is one line naming the file, here and in log()
            self.file = open(self.path, "w", encoding="utf-8")
            for r in kept:
                self.file.write(json.dumps(r) + "\n")
        self.tb = None
        if lc.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            with writing(run_dir / TB_DIR):
                self.tb = SummaryWriter(str(run_dir / TB_DIR), purge_step=start_step + 1 if start_step else None)
        interactive = lc.progress and sys.stderr.isatty()
        self.bar = tqdm(total=max_steps, initial=start_step, disable=not interactive, dynamic_ncols=True,
                        unit="step", file=sys.stderr)
        self.plain = lc.progress and not interactive  # logs and CI get a line per log interval instead

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        row = {"step": step, "split": split, **metrics}
        with writing(self.path):
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.tb:
            with writing(self.run_dir / TB_DIR):
                for k, v in metrics.items():
                    self.tb.add_scalar(f"{split}/{k}", v, step)
        if split == "train":
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                 tok_s=f"{metrics['tok_s']:.0f}", refresh=False)
        text = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        if split != "train":
            self.bar.write(f"step {step} {split}: {text}")
        elif self.plain:
            print(f"step {step}: {text}", flush=True)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def close(self, schedule: list[float] | None = None, metric: str = "loss") -> Path | None:
        """Finish; `schedule` is the planned learning rate of every step, drawn under the logged one;
        `metric` (other than loss): the val metric the run selects by, drawn in a third panel."""
        self.bar.close()
        with writing(self.path):
            self.file.close()
        if self.tb:
            with writing(self.run_dir / TB_DIR):
                self.tb.close()
        return plot_curves(self.run_dir, schedule, metric)


class NullTracker:
    """The tracker of ranks other than 0: only rank 0 writes the run directory."""

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def close(self, schedule: list[float] | None = None, metric: str = "loss") -> None:
        return None


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
