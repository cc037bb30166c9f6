"""DDP scaling on this machine: `lmforge pretrain` on 1 process against 2 (torchrun, gloo), same global batch.

The model is configs/shakespeare-char.yaml's shape (4 layers, width 128, context 64) on Tiny Shakespeare,
global batch 32 sequences. One process runs twice, with every core as intra-op threads and with one
thread, and the better of the two is the baseline; each of the two DDP processes gets half the cores.
Throughput is the median of the logged train tok/s (every rank's tokens), leaving out the first window.
On an idle 2-core CPU expect a ratio near 1 (one process already uses both cores), on N GPUs near N;
on a busy CPU intra-op threads that wait for each other can make one process much slower than two.

Last line: RESULT ddp2_over_1=...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from lmforge.train import perf  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
GLOBAL_BATCH = 32


def run(nproc: int, threads: int, steps: int, tmp: Path) -> float:
    """tokens/s of a `steps`-step run on `nproc` processes with `threads` intra-op threads each."""
    # a fixed peak in a private cache, so no process spends the run measuring matmul speed
    (tmp / "peak_flops.json").write_text(json.dumps(
        {perf.cache_key(str(torch.float32), threads): perf.cache_entry(1e11)}))
    run_dir = tmp / f"run{nproc}x{threads}"
    args = ["pretrain", "--data.path", str(DATA), "--data.tokenizer.kind", "char", "--data.cache_dir", str(tmp / "cache"),
            "--model.n_layer", "4", "--model.n_head", "4", "--model.d_model", "128", "--model.max_seq_len", "64", "--model.mlp", "gelu",
            "--model.dropout", "0", "--train.batch_size", str(GLOBAL_BATCH // nproc), "--train.max_steps", str(steps),
            "--train.warmup_steps", "1", "--train.checkpoint_every", "0", "--train.device", "cpu",
            "--eval.every", "0", "--eval.batches", "1", "--log.every", "5", "--log.progress", "false",
            "--log.trackers", "[]", "--log.samples", "0", "--log.run_dir", str(run_dir)]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads), "LMFORGE_CACHE": str(tmp)}
    subprocess.run([sys.executable, *launcher, "-m", "lmforge", *args], env=env, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tok_s"] for r in rows if r["split"] == "train" and r["step"] > 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    if not DATA.is_file():
        sys.exit(f"data not found: {DATA}")
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        one_all = run(1, cores, args.steps, Path(tmp))
        one_single = run(1, 1, args.steps, Path(tmp))
        two = run(2, max(1, cores // 2), args.steps, Path(tmp))
    one = max(one_all, one_single)
    print(f"cores: {cores}; global batch {GLOBAL_BATCH} x 64 tokens; {args.steps} steps")
    print(f"1 process, {cores} threads:       {one_all:9.0f} tok/s")
    print(f"1 process, 1 thread:         {one_single:9.0f} tok/s")
    print(f"2 processes (DDP), {max(1, cores // 2)} each: {two:9.0f} tok/s")
    print(f"RESULT ddp2_over_1={two / one:.3f}")


if __name__ == "__main__":
    main()
