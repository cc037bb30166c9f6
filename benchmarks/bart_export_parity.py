"""A translation run in BART's layout, exported by `lmforge export`, decoded by transformers' generate() against
lmforge translate on real dev sentences: how many hypotheses are identical, both BLEU scores and both speeds.

--run RUN: a seq2seq run trained with --model.preset bart-tiny (or any BART-layout run), e.g.
  lmforge train --config configs/translate-multi30k.yaml --model.preset bart-tiny --log.run_dir runs/bart
The dev files are the run's own (seq2seq.dev / dev_target). Each sentence is decoded alone on both sides, with
the run's beam size and length penalty and lmforge's cap (seq2seq.max_length_ratio x its source tokens + 10),
which generate() takes per call as max_new_tokens. Last line:
RESULT identical=... n=... bleu_lmforge=... bleu_hf=... hf_over_lmforge_time=...
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from lmforge.generate import translate  # noqa: E402
from lmforge.hf.export import export_hf  # noqa: E402
from lmforge.metrics import translation_scores  # noqa: E402
from lmforge.runs import load_run  # noqa: E402


def lines(path: str, n: int) -> list[str]:
    return Path(path).read_text(encoding="utf-8").splitlines()[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path, help="a seq2seq run in BART's layout")
    ap.add_argument("--sentences", type=int, default=300, help="dev sentences decoded [default: 300]")
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()  # generate() notes that max_new_tokens overrides max_length
    model, tok, cfg = load_run(args.run)
    sc = cfg.seq2seq
    sources, references = lines(sc.dev, args.sentences), lines(sc.dev_target, args.sentences)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(args.run, Path(tmp) / "hf")
        hf = transformers.BartForConditionalGeneration.from_pretrained(Path(tmp) / "hf").eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(Path(tmp) / "hf")

    start = time.perf_counter()
    ours = [translate(model, tok, [s], beam_size=sc.beam_size, length_penalty=sc.length_penalty,
                      max_length_ratio=sc.max_length_ratio)[0] for s in sources]
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = []
    for text in sources:
        ids = hf_tok(text, return_tensors="pt")
        cap = min(math.ceil(sc.max_length_ratio * ids["input_ids"].shape[1]) + 10, cfg.model.max_seq_len - 1)
        with torch.no_grad():  # the folder's generation_config.json: the run's beam size and length penalty
            out = hf.generate(**ids, max_new_tokens=cap)
        theirs.append(hf_tok.decode(out[0], skip_special_tokens=True).strip())
    theirs_s = time.perf_counter() - start

    same = sum(a == b for a, b in zip(ours, theirs))
    bleu_ours = translation_scores(ours, references, sc.bleu_tokenize)[0]["bleu"]
    bleu_theirs = translation_scores(theirs, references, sc.bleu_tokenize)[0]["bleu"]
    print(f"{args.run}: {len(sources)} dev sentences of {sc.dev}, beam {sc.beam_size}, length penalty "
          f"{sc.length_penalty}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"identical hypotheses: {same} of {len(sources)}; BLEU lmforge {bleu_ours:.2f}, transformers "
          f"{bleu_theirs:.2f}; decoding time lmforge {ours_s:.1f} s, transformers {theirs_s:.1f} s")
    for a, b in [(a, b) for a, b in zip(ours, theirs) if a != b][:3]:
        print(f"  differs: lmforge {a!r}\n           hf      {b!r}")
    print(f"RESULT identical={same} n={len(sources)} bleu_lmforge={bleu_ours:.2f} bleu_hf={bleu_theirs:.2f} "
          f"hf_over_lmforge_time={theirs_s / ours_s:.2f}")


if __name__ == "__main__":
    main()
