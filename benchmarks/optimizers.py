"""AdamW, Muon(+AdamW) and SGD with momentum on the same model, data and step budget.

The foundation's ~10M GPT (preset gpt-10m: 6 layers, width 384, context 256) with a character
vocabulary on ../shared/data/tinyshakespeare (first 90% train, last 10% val), a fixed number of steps
of 8 x 256 tokens, linear warmup and cosine decay to a tenth of the peak. Each optimizer gets a
sweep of three learning rates (for Muon, its lr for the hidden matrices; its AdamW part keeps
train.lr); every run starts from the same initial weights and sees the same batches. The table
shows the val loss of each run (the same 16 val batches of 8 x 256) and the best of each optimizer.

Last line: RESULT adamw=... muon=... sgd=...   (the best val loss of each)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from lmforge.config import load_config  # noqa: E402
from lmforge.train.loop import train  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

SWEEPS = {  # optimizer -> (the swept option, its values, fixed options)
    "adamw": ("train.lr", (3e-4, 1e-3, 3e-3), {}),
    "muon": ("train.muon_lr", (0.02, 0.05, 0.1), {"train.lr": 1e-3}),
    "sgd": ("train.lr", (0.03, 0.1, 0.3), {"train.momentum": 0.9, "train.nesterov": True}),
}


def run(optimizer: str, key: str, value: float, fixed: dict, steps: int, tmp: str) -> tuple[float, float]:
    lr = fixed.get("train.lr", value)
    over = {
        "model.preset": "gpt-10m", "model.pos": "rope", "model.norm": "rmsnorm", "model.bias": False, "model.mlp": "gelu",
        "data.path": str(DATA), "data.tokenizer.kind": "char", "data.cache_dir": f"{tmp}/cache",
        "train.optimizer": optimizer, "train.batch_size": 8, "train.max_steps": steps,
        "train.warmup_steps": max(1, steps // 10), "train.lr": lr, "train.min_lr": lr / 10,
        "train.weight_decay": 0.1, "train.checkpoint_every": 0, "train.device": "cpu", "train.seed": 0,
        "eval.every": 0, "eval.batches": 16, "eval.batch_size": 8,
        "log.run_dir": f"{tmp}/{optimizer}-{value:g}", "log.progress": False, "log.trackers": [],
        "log.samples": 0, "log.every": max(1, steps // 5), **fixed, key: value,
    }
    if optimizer == "muon":  # the floor of the Muon groups follows the same ratio as the AdamW part
        over["train.min_lr"] = over["train.lr"] / 10
    start = time.perf_counter()
    result = train(load_config(overrides=over))
    return result.last_val["loss"], time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    if not DATA.is_file():
        sys.exit(f"skipped: {DATA} is missing (the benchmark reads the shared data set beside the repository)")
    results: dict[str, list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for optimizer, (key, values, fixed) in SWEEPS.items():
            for value in values:
                loss, seconds = run(optimizer, key, value, fixed, args.steps, tmp)
                results.setdefault(optimizer, []).append((value, loss, seconds))
                print(f"  {optimizer:6} {key}={value:g}: val loss {loss:.4f} ({seconds:.0f} s)", flush=True)
    print(f"\nval loss after {args.steps} steps of 8 x 256 characters (gpt-10m, Tiny Shakespeare)")
    print(f"{'optimizer':10} {'swept':14} " + "  ".join(f"{'value':>7} {'val':>7}" for _ in range(3)) + "   best")
    best = {}
    for optimizer, rows in results.items():
        best[optimizer] = min(loss for _, loss, _ in rows)
        cells = "  ".join(f"{v:7g} {loss:7.4f}" for v, loss, _ in rows)
        print(f"{optimizer:10} {SWEEPS[optimizer][0]:14} {cells}   {best[optimizer]:.4f}")
    print("RESULT " + " ".join(f"{k}={v:.4f}" for k, v in best.items()))


if __name__ == "__main__":
    main()
