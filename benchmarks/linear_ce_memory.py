"""Memory and time of the chunked linear + cross-entropy against the naive logits + F.cross_entropy.

2,048 hidden states of width 768, output vocabularies of 32k and 128k, fp32, forward and backward of
the mean loss with respect to the hidden states and the output weight. Naive is what a plain PyTorch
model does: `F.cross_entropy(hidden @ weight.T, targets)`. Chunked is `lmforge.losses.linear_cross_entropy`.

Memory is the peak resident memory during forward + backward above what was resident before (inputs
and weight), see `memory.py`. Both methods must leave the same two
gradients behind ([N, d] and [V, d]: 390 MiB at 128k), so the table shows the peak with them and the
working memory without them (peak minus what stays allocated at the end); the RESULT line reports
the working-memory ratio and the ratio with the gradients. Time: medians of interleaved repeats.

Goal (issue 3) at 128k: memory <= 0.10x naive, time <= 1.1x naive.
Last line: RESULT mem_ratio_128k=... time_ratio_128k=...
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lmforge.losses import linear_cross_entropy  # noqa: E402
from memory import peak_bytes  # noqa: E402

N, WIDTH = 2048, 768


def naive(hidden, weight, targets):
    F.cross_entropy(hidden @ weight.t(), targets).backward()


def chunked(hidden, weight, targets):
    linear_cross_entropy(hidden, weight, targets).backward()


METHODS = {"naive": naive, "chunked": chunked}


def measure(vocab: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, WIDTH, generator=gen, requires_grad=True)
    weight = (torch.randn(vocab, WIDTH, generator=gen) * 0.02).requires_grad_()
    targets = torch.randint(vocab, (N,), generator=gen)

    def run(fn):
        hidden.grad = weight.grad = None
        fn(hidden, weight, targets)

    out = {}
    for name, fn in METHODS.items():
        hidden.grad = weight.grad = None  # freed before the baseline, not during the measured call
        peak, left = peak_bytes(lambda: fn(hidden, weight, targets))
        out[name] = {"peak": peak, "work": peak - left, "times": []}
    grads = {}
    for name, fn in METHODS.items():
        run(fn)
        grads[name] = (hidden.grad.clone(), weight.grad.clone())
    err = max((a - b).abs().max().item() for a, b in zip(grads["naive"], grads["chunked"]))
    for _ in range(repeats):  # interleaved: A B A B ...
        for name, fn in METHODS.items():
            t = time.perf_counter()
            run(fn)
            out[name]["times"].append(time.perf_counter() - t)
    for name in METHODS:
        out[name]["time"] = statistics.median(out[name]["times"])
    out["grad_err"] = err
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; N={N}, d={WIDTH}, fp32, forward + backward")
    mib = 2 ** 20
    results = {}
    for vocab in (32768, 131072):
        r = results[vocab] = measure(vocab, args.repeats)
        nv, ch = r["naive"], r["chunked"]
        print(f"\nvocabulary {vocab}  (max |grad difference| {r['grad_err']:.1e})")
        print(f"  {'':8} {'peak MiB':>9} {'working MiB':>12} {'time s':>8}")
        for name in METHODS:
            m = r[name]
            print(f"  {name:8} {m['peak'] / mib:9.1f} {m['work'] / mib:12.1f} {m['time']:8.3f}")
        print(f"  ratio    {ch['peak'] / nv['peak']:9.3f} {ch['work'] / nv['work']:12.3f} {ch['time'] / nv['time']:8.3f}")
    r = results[131072]
    mem_ratio = r["chunked"]["work"] / r["naive"]["work"]
    with_grads = r["chunked"]["peak"] / r["naive"]["peak"]
    time_ratio = r["chunked"]["time"] / r["naive"]["time"]
    print(f"\n128k: working memory {mem_ratio:.3f}x naive (goal <= 0.10), with the gradients {with_grads:.3f}x, "
          f"time {time_ratio:.3f}x naive (goal <= 1.1)")
    print(f"RESULT mem_ratio_128k={mem_ratio:.3f} time_ratio_128k={time_ratio:.3f} mem_ratio_with_grads_128k={with_grads:.3f}")


if __name__ == "__main__":
    main()
