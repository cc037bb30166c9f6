"""SFT training throughput with finetune.pack: real (non-padding) tokens per second of packed batches
against the padded batches of the same examples.

Both sides run SFTTask's own collate and loss on the same fresh GPT (RoPE, SwiGLU, RMSNorm; --layers x
--width, context --max-length) and the same examples: random prompt + response token ids of mixed lengths,
uniform in [--min-len, --max-length] tokens, prompt tokens (the first half) carrying no loss, in batches
of --batch examples drawn in a seeded random order (finetune.group_by_length = false: mixed lengths in a
batch, where padding costs most).

  - packed (finetune.pack = true): each batch's examples share rows of up to --max-length tokens (first-fit
    decreasing), each attending only to itself (SDPA with a block-diagonal causal mask);
  - the peer, padded (finetune.pack = false, today's default): one example per row, right-padded to the
    batch's longest (SDPA's is_causal fast path, no mask).

A step is the forward and backward pass of one batch (loss / real target count, as the loop divides it;
the optimizer step, the same on both sides, is left out). The sides run interleaved in this process (a
warm-up pass of each first), same threads, fp32, batch by batch (a batch's packed and padded steps back to back, which goes first
alternating), so that a shared machine's load falls on both; each figure is the median of --repeats passes
over the same --batches batches, counting only the examples' own tokens. The first batch's loss must agree
(checked).

Last line: RESULT packed_tok_s_ratio=<packed tok/s / padded tok/s> packed_tok_s=... padded_tok_s=...
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from lmforge.config import load_config  # noqa: E402
from lmforge.losses import IGNORE_INDEX  # noqa: E402
from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.transformer import GPT  # noqa: E402
from lmforge.tasks.finetune import Encoded  # noqa: E402
from lmforge.tasks.sft import SFTTask  # noqa: E402

VOCAB = 2000


def examples(n: int, min_len: int, max_len: int, seed: int) -> list[Encoded]:
    """Encoded sft rows: ids, and targets that ignore the prompt (the first half) and score the response."""
    rng = np.random.default_rng(seed)
    rows = []
    for length in rng.integers(min_len, max_len + 1, n):
        ids = rng.integers(2, VOCAB, length + 1).tolist()
        prompt = length // 2
        rows.append(Encoded(ids[:-1], None, [IGNORE_INDEX] * (prompt - 1) + ids[prompt:]))
    return rows


def sft_task(pack: bool, max_length: int) -> SFTTask:
    task = SFTTask(load_config(overrides={"task": "sft", "finetune.pack": pack}))
    task.max_length, task.pad_id = max_length, 0  # what setup() reads from the tokenizer and the model
    return task


def step(task: SFTTask, model: GPT, batch: dict) -> float:
    model.zero_grad(set_to_none=True)
    loss = task.loss(model, batch) / task.count(batch)
    loss.backward()
    return float(loss.detach())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=6, help="batches per timed pass")
    ap.add_argument("--batch", type=int, default=16, help="examples per batch")
    ap.add_argument("--min-len", type=int, default=16, help="shortest example (tokens)")
    ap.add_argument("--max-length", type=int, default=256, help="longest example and the packed row (tokens)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5, help="timed passes of each side")
    # one thread by default: on a shared 2-core machine two threads per process oversubscribe the cores and
    # a pass's time varies several-fold; the ratio came out the same (1.36) with 2 threads, at 4x the time
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, max_seq_len=args.max_length, n_layer=args.layers, n_head=4,
                      d_model=args.width, pos="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    model = GPT(cfg).train()
    rows = examples(args.batches * args.batch, args.min_len, args.max_length, seed=0)
    order = np.random.default_rng(1).permutation(len(rows))
    chosen = [[rows[i] for i in order[b * args.batch:(b + 1) * args.batch]] for b in range(args.batches)]
    real = sum(len(r.ids) for r in rows)
    sides = {}
    for name, pack in (("packed", True), ("padded", False)):
        task = sft_task(pack, args.max_length)
        sides[name] = (task, [task.collate(c, [None] * len(c)) for c in chosen])
    shapes = {name: sum(b["input"].numel() for b in batches) for name, (_, batches) in sides.items()}
    print(f"SFT forward + backward, GPT {args.layers}x{args.width} (RoPE), {len(rows)} examples of "
          f"{args.min_len}-{args.max_length} tokens ({real} real) in {args.batches} batches of {args.batch}; "
          f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, fp32; median of {args.repeats} "
          "interleaved passes")
    first = {name: step(task, model, batches[0]) for name, (task, batches) in sides.items()}  # warm-up
    for name, (task, batches) in sides.items():
        for batch in batches[1:]:
            step(task, model, batch)
    if abs(first["packed"] - first["padded"]) > 1e-4 * abs(first["padded"]):
        sys.exit(f"packing: the packed and padded losses disagree: {first}")
    seconds = {name: [] for name in sides}
    for r in range(args.repeats):
        spent = dict.fromkeys(sides, 0.0)
        for b in range(args.batches):  # the same examples on both sides, in turn, which goes first alternating
            for name in (list(sides) if (r + b) % 2 == 0 else list(sides)[::-1]):
                task, batches = sides[name]
                start = time.perf_counter()
                step(task, model, batches[b])
                spent[name] += time.perf_counter() - start
        for name in sides:
            seconds[name].append(spent[name])
    rate = {name: real / statistics.median(s) for name, s in seconds.items()}
    for name in sides:
        print(f"{name:7s} {rate[name]:9.0f} real tok/s   {shapes[name]:6d} tokens in rows "
              f"({real / shapes[name]:.0%} real)   runs {', '.join(f'{s:.2f}' for s in seconds[name])} s   "
              f"first loss {first[name]:.6f}")
    print(f"RESULT packed_tok_s_ratio={rate['packed'] / rate['padded']:.2f} packed_tok_s={rate['packed']:.0f} "
          f"padded_tok_s={rate['padded']:.0f}")


if __name__ == "__main__":
    main()
