"""Decoding speed of a trained translation run on the Multi30k val set: greedy and beam 5, each with the
self-attention KV cache and without it (every step re-feeds the whole prefix).

    python benchmarks/translate_speed.py --checkpoint RUN   (RUN: e.g. a configs/translate-multi30k.yaml run)

The four modes run interleaved in this process (greedy cached, greedy uncached, beam cached, beam
uncached, then again), on the same sentences, batch size and threads; each figure is the median of
--repeats. With and without the cache must give the same translations (checked). sentences/s counts
the source sentences translated, detokenised output included.

Goal (issue): the cache at least 1.5x faster for beam 5.
Last line: RESULT greedy_sps=... beam5_sps=... cache_speedup=... (cache_speedup: beam 5, cached / uncached)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from lmforge.generate import translate  # noqa: E402
from lmforge.metrics import translation_scores  # noqa: E402
from lmforge.tasks.seq2seq import source_tokenizer  # noqa: E402
from lmforge.runs import load_run  # noqa: E402

VAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a seq2seq run directory (English -> German)")
    ap.add_argument("--sentences", type=int, default=400, help="the first N val sentences (0 = all 1,014)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes of each mode")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, cfg = load_run(args.checkpoint, "cpu")
    sources = (VAL / "val.en").read_text(encoding="utf-8").splitlines()
    references = (VAL / "val.de").read_text(encoding="utf-8").splitlines()
    if args.sentences:
        sources, references = sources[:args.sentences], references[:args.sentences]
    sc = cfg.seq2seq
    modes = {(beam, cache): dict(beam_size=beam, use_cache=cache) for beam in (1, args.beam) for cache in (True, False)}
    seconds = {m: [] for m in modes}
    outputs = {}
    src_tok = source_tokenizer(Path(args.checkpoint))
    translate(model, tok, sources[:args.batch_size], beam_size=args.beam, source_tokenizer=src_tok)  # warm-up
    for _ in range(args.repeats):
        for mode, kw in modes.items():
            start = time.perf_counter()
            outputs[mode] = translate(model, tok, sources, length_penalty=sc.length_penalty,
                                      max_length_ratio=sc.max_length_ratio, batch_size=args.batch_size,
                                      source_tokenizer=src_tok, **kw)
            seconds[mode].append(time.perf_counter() - start)
    sps = {m: len(sources) / statistics.median(s) for m, s in seconds.items()}
    for beam in (1, args.beam):
        same = outputs[(beam, True)] == outputs[(beam, False)]
        bleu = translation_scores(outputs[(beam, True)], references, sc.bleu_tokenize)[0]["bleu"]
        print(f"{'greedy' if beam == 1 else f'beam {beam}':>7}: {sps[(beam, True)]:7.1f} sentences/s with the cache, "
              f"{sps[(beam, False)]:7.1f} without: {sps[(beam, True)] / sps[(beam, False)]:.2f}x; BLEU {bleu:.2f}; "
              f"same output with and without: {same}")
        if not same:
            raise SystemExit("the cached and uncached translations differ")
    print(f"{len(sources)} sentences, batch {args.batch_size}, {args.threads} threads, median of {args.repeats}")
    print(f"RESULT greedy_sps={sps[(1, True)]:.1f} beam{args.beam}_sps={sps[(args.beam, True)]:.1f} "
          f"cache_speedup={sps[(args.beam, True)] / sps[(args.beam, False)]:.2f} "
          f"greedy_cache_speedup={sps[(1, True)] / sps[(1, False)]:.2f}")


if __name__ == "__main__":
    main()
