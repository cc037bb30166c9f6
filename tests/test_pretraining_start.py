"""What a pre-training run tells a newcomer before it spends the time: the corpus line at its start (files,
size, tokens, the split, and how many epochs the steps cover), and an evaluation sized to a few batches."""

from __future__ import annotations

import pytest

from helpers import synthetic_text, tiny_config, tiny_overrides, write_corpus
from lmforge.config import load_config
from lmforge.losses import IGNORE_INDEX
from lmforge.tasks import make_task
from lmforge.train.loop import train


def test_a_pretraining_run_starts_with_its_corpus_line(tmp_path, capsys):
    corpus = write_corpus(tmp_path, "abcdefghij\n" * 200)  # 2,200 one-byte characters
    train(tiny_config(tmp_path, corpus, train__max_steps=5, train__grad_accum=2))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("lmforge: corpus")]
    # 2,200 characters and the end-of-text token; the last 10% (220) are val; each step reads 4 x 2 windows of 16
    assert lines == [f"lmforge: corpus {corpus}: 1 file, 2.2 kB, 2.2k tokens (train 1.98k, val 220); "
                     "5 steps x 8 x 16 tokens = 640 tokens, 0.323 epochs"]


@pytest.mark.parametrize("task, extra, window", [
    ("mlm", {"data.tokenizer.kind": "wordpiece", "data.tokenizer.vocab_size": 200}, 14),  # less [CLS] and 2 [SEP]
    ("span", {}, 16),
])
def test_the_corpus_line_counts_the_corpus_tokens_an_example_reads(tmp_path, task, extra, window):
    corpus = write_corpus(tmp_path, synthetic_text(20_000))
    t = make_task(load_config(overrides=tiny_overrides(tmp_path, corpus, task=task, **extra)))
    t.setup()
    tokens = 4 * 4 * window  # train.max_steps x train.batch_size x window
    assert t.summary().endswith(f"; 4 steps x 4 x {window} tokens = {tokens} tokens, "
                                f"{tokens / len(t.data.train):.3g} epochs")


def val_read(cfg) -> tuple[int, int, int]:
    """(the val tokens one evaluation of the task reads as input, the targets it scores, the val targets there are)."""
    task = make_task(cfg)
    task.setup()
    batches = list(task.eval_batches())
    scored = sum(int((b["target"] != IGNORE_INDEX).sum()) for b in batches)
    return sum(b["input"].numel() for b in batches), scored, len(task.data.val) - 1


def test_a_default_evaluation_reads_four_training_batches_of_text(tmp_path):
    corpus = write_corpus(tmp_path, synthetic_text(60_000))  # 6,000 val tokens
    defaults = {"data.path": str(corpus), "data.tokenizer.kind": "char", "data.cache_dir": str(tmp_path / "cache"),
                "model.max_seq_len": 16}
    cfg = load_config(overrides=defaults)
    assert cfg.eval.batch_size == cfg.train.batch_size == 16
    assert val_read(cfg)[0] == 4 * 16 * 16
    # eval.batches and eval.batch_size still set it; 0 batches is the whole val split
    assert val_read(load_config(overrides={**defaults, "eval.batches": 2, "train.batch_size": 8}))[0] == 2 * 8 * 16
    assert val_read(load_config(overrides={**defaults, "eval.batches": 3, "eval.batch_size": 5}))[0] == 3 * 5 * 16
    _, scored, there = val_read(load_config(overrides={**defaults, "eval.batches": 0}))
    assert scored == there
