"""The Shakespeare-char CPU task, against nanoGPT's CPU recipe as the peer figure.

Data: ../shared/data/tinyshakespeare/input.txt, the first 90% of the characters for training and the
last 10% for validation, a character vocabulary, context 64, at most 1M parameters. nanoGPT's CPU
recipe (4 layers, 4 heads, width 128, batch 12, 2,000 iterations, no dropout) reaches val loss 1.886
in 161 s of training on this machine. lmforge trains configs/shakespeare-char.yaml and scores the
whole val split (every target character once).

Goal (issue 2): val loss <= 1.88 in at most 80 s of training.
Last line: RESULT val_loss=... train_s=...
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from lmforge.config import load_config  # noqa: E402
from lmforge.runs import load_run  # noqa: E402
from lmforge.train.loop import train  # noqa: E402

NANOGPT_VAL, NANOGPT_SECONDS = 1.886, 161.0
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="extra dotted config overrides, key=value")
    args = ap.parse_args()
    if not DATA.is_file():
        sys.exit(f"skipped: {DATA} is missing (the benchmark reads the shared data set beside the repository)")
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"data.path": str(DATA), "data.cache_dir": f"{tmp}/cache", "log.run_dir": f"{tmp}/run",
                     "log.progress": "false", "log.trackers": "[]"}
        overrides.update(dict(o.split("=", 1) for o in args.overrides))
        cfg = load_config(ROOT / "configs" / "shakespeare-char.yaml", overrides)
        result = train(cfg)
        model, tok, _ = load_run(result.run_dir)
        n_params = sum(p.numel() for p in model.parameters())
    assert cfg.eval.batches == 0, "the val loss must cover the whole val split"
    print(f"model: {n_params:,} parameters (limit 1,000,000), vocabulary {tok.get_vocab_size()}, "
          f"context {cfg.model.max_seq_len}, {result.step} steps of {cfg.train.batch_size}")
    print(f"val loss (whole val split, {result.last_val['tokens']:,} targets): lmforge {result.last_val['loss']:.4f}, "
          f"nanoGPT {NANOGPT_VAL}")
    print(f"training time: lmforge {result.train_seconds:.1f} s, nanoGPT {NANOGPT_SECONDS:.0f} s "
          f"(ratio {result.train_seconds / NANOGPT_SECONDS:.2f}); goal val <= 1.88 in <= 80 s")
    print(f"RESULT val_loss={result.last_val['loss']:.4f} train_s={result.train_seconds:.1f}")


if __name__ == "__main__":
    main()
