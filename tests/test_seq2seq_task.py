"""The seq2seq (translation) and span-corruption tasks: token-count batches, span corruption, checkpoint
averaging, and whole runs through the CLI on small real and synthetic data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import SEQ2SEQ_TINY, number_pairs, write_tsv
from lmforge.cli import main
from lmforge.data.batches import ExampleBatches
from lmforge.losses import IGNORE_INDEX
from lmforge.tasks.seq2seq import collate
from lmforge.tasks.span import corrupt, span_counts
from lmforge.train.checkpoint import average_checkpoints

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MULTI30K = SHARED / "multi30k"

# -- batches ---------------------------------------------------------------------------------------


def test_token_batches_cover_the_epoch_within_the_budget_and_resume():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=500).tolist()
    make = lambda idx, epoch, batch: list(idx)  # noqa: E731
    b = ExampleBatches(lengths, 8, seed=1, make=make, max_tokens=256)
    epoch = [next(b) for _ in range(b.steps_per_epoch())]
    assert sorted(i for batch in epoch for i in batch) == list(range(500))
    assert all(len(batch) * max(lengths[i] for i in batch) <= 256 for batch in epoch)
    assert max(len(batch) for batch in epoch) > 3 * min(len(batch) for batch in epoch)  # short ones share big batches
    state = b.state_dict()
    ahead = [next(b) for _ in range(5)]
    again = ExampleBatches(lengths, 8, seed=1, make=make, max_tokens=256)
    again.load_state_dict(state)
    assert [next(again) for _ in range(5)] == ahead


def test_collate_shifts_the_target_into_the_decoder_input():
    batch = collate([[5, 6, 3], [7, 3]], [[8, 9, 10, 3], [11, 3]], pad=0, bos=2)
    assert batch["decoder_input"].tolist() == [[2, 8, 9, 10], [2, 11, 0, 0]]
    assert batch["target"].tolist() == [[8, 9, 10, 3], [11, 3, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["source_mask"].tolist() == [[True, True, True], [True, True, False]]


# -- span corruption ---------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [20, 64, 127])
def test_span_corruption_reconstructs_the_window(length):
    tokens = np.arange(100, 100 + length)
    sentinels, eos = list(range(50, 90)), 3
    rng = np.random.default_rng(length)
    source, target = corrupt(tokens, 0.15, 3.0, sentinels, eos, rng)
    noise, spans = span_counts(length, 0.15, 3.0)
    assert source[-1] == eos and target[-1] == eos
    assert sum(t >= 100 for t in target) == noise
    assert sum(s in sentinels for s in source) == spans == sum(t in sentinels for t in target)
    # putting each span back after its sentinel gives the window
    fill, current = {}, None
    for t in target[:-1]:
        if t in sentinels:
            current = t
            fill[t] = []
        else:
            fill[current].append(t)
    rebuilt = [x for s in source[:-1] for x in (fill[s] if s in sentinels else [s])]
    assert rebuilt == tokens.tolist()


def test_span_corruption_differs_between_draws():
    tokens = np.arange(100, 164)
    a = corrupt(tokens, 0.15, 3.0, list(range(50, 90)), 3, np.random.default_rng(1))
    b = corrupt(tokens, 0.15, 3.0, list(range(50, 90)), 3, np.random.default_rng(2))
    assert a != b


def test_average_checkpoints_is_the_elementwise_mean(tmp_path):
    states = [{"w": torch.randn(3, 4), "b": torch.randn(4)} for _ in range(3)]
    paths = []
    for i, s in enumerate(states):
        paths.append(tmp_path / f"step_{i:08d}.pt")
        torch.save({"model": s}, paths[-1])
    avg = average_checkpoints(paths)
    for k in ("w", "b"):
        torch.testing.assert_close(avg[k], torch.stack([s[k] for s in states]).mean(0))


# -- whole runs ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_translation_run_learns_a_toy_language_pair_end_to_end(tmp_path, capsys):
    train = write_tsv(tmp_path / "train.tsv", number_pairs(3000, 0))
    dev = write_tsv(tmp_path / "dev.tsv", number_pairs(60, 1))
    run = tmp_path / "run"
    code = main(["train", "--task", "seq2seq", *SEQ2SEQ_TINY, "--seq2seq.train", str(train), "--seq2seq.dev", str(dev),
                 "--data.tokenizer.vocab_size", "300", "--seq2seq.max_tokens", "1024", "--loss.label_smoothing", "0.1",
                 "--train.lr", "3e-3", "--train.max_steps", "300", "--train.warmup_steps", "30",
                 "--train.checkpoint_every", "50", "--train.keep_checkpoints", "3", "--seq2seq.average_last", "3",
                 "--eval.every", "150", "--seq2seq.beam_size", "3", "--log.run_dir", str(run)])
    out = capsys.readouterr().out
    assert code == 0
    assert "BLEU signature: nrefs:1|case:mixed|eff:no|tok:13a" in out and "chrF signature" in out
    assert "hypothesis:" in out and "checkpoint averaging: 3 checkpoints" in out
    scores = json.loads((run / "dev_scores.json").read_text())
    assert scores["bleu"] > 60, scores  # an untrained model scores about 0
    png = (run / "curves.png").read_bytes()
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width / height > 3.5  # three panels (loss, lr, val bleu), not two
    hyps = (run / "dev.translations.txt").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == 60
    # `translate` reads standard input or a file and gives what the run's own evaluation gave
    src = tmp_path / "dev.en"
    src.write_text("".join(s + "\n" for s, _ in number_pairs(60, 1)), encoding="utf-8")
    ref = tmp_path / "dev.de"
    ref.write_text("".join(t + "\n" for _, t in number_pairs(60, 1)), encoding="utf-8")
    out_file = tmp_path / "out.de"
    assert main(["translate", "--checkpoint", str(run), "--input", str(src), "--output", str(out_file),
                 "--reference", str(ref), "--device", "cpu"]) == 0
    assert out_file.read_text(encoding="utf-8").splitlines() == hyps
    err = capsys.readouterr().err
    assert f"RESULT bleu={scores['bleu']:.2f}" in err
    # greedy from the CLI equals greedy without the KV cache
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    main(["translate", "--checkpoint", str(run), "--input", str(src), "--output", str(a), "--beam", "1"])
    main(["translate", "--checkpoint", str(run), "--input", str(src), "--output", str(b), "--beam", "1", "--no-cache"])
    assert a.read_text() == b.read_text()


@pytest.mark.slow
def test_translate_refuses_bad_input_with_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    train = write_tsv(tmp_path / "train.tsv", number_pairs(200, 0))
    assert main(["train", "--task", "seq2seq", *SEQ2SEQ_TINY, "--seq2seq.train", str(train), "--seq2seq.dev", str(train),
                 "--data.tokenizer.vocab_size", "200", "--train.max_steps", "2", "--train.warmup_steps", "0",
                 "--seq2seq.eval_bleu", "false", "--seq2seq.samples", "0", "--log.run_dir", str(run)]) == 0
    capsys.readouterr()
    src, ref = tmp_path / "src.txt", tmp_path / "ref.txt"
    src.write_text("one two\nthree\n")
    ref.write_text("eins zwei\n")
    assert main(["translate", "--checkpoint", str(run), "--input", str(src), "--reference", str(ref)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has 1 lines and the input 2" in err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"one\n\xff two\n")
    assert main(["translate", "--checkpoint", str(run), "--input", str(bad)]) == 2
    assert f"{bad}:2" in capsys.readouterr().err


def test_misaligned_parallel_files_stop_the_run_before_anything_is_written(tmp_path, capsys):
    src, tgt = tmp_path / "train.en", tmp_path / "train.de"
    src.write_text("a\nb\nc\n")
    tgt.write_text("x\ny\n")
    run = tmp_path / "run"
    code = main(["train", "--task", "seq2seq", *SEQ2SEQ_TINY, "--seq2seq.train", str(src), "--seq2seq.train_target", str(tgt),
                 "--seq2seq.dev", str(src), "--seq2seq.dev_target", str(tgt), "--log.run_dir", str(run)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "has 3 lines" in err and "has 2" in err and err.count("\n") == 0
    assert not run.exists()


def test_translation_needs_dev_pairs(tmp_path, capsys):
    train = write_tsv(tmp_path / "train.tsv", number_pairs(20, 0))
    assert main(["train", "--task", "seq2seq", *SEQ2SEQ_TINY, "--seq2seq.train", str(train)]) == 2
    assert "seq2seq.dev: expected dev pairs" in capsys.readouterr().err


@pytest.mark.skipif(not MULTI30K.is_dir(), reason="needs ../shared/data/multi30k")
@pytest.mark.slow
def test_span_corruption_loss_falls_and_initialises_translation(tmp_path, capsys):
    corpus = tmp_path / "mono"
    corpus.mkdir()
    lines = (MULTI30K / "train.en").read_text(encoding="utf-8").splitlines()[:3000]
    (corpus / "en.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    span = tmp_path / "span"
    assert main(["train", "--task", "span", *SEQ2SEQ_TINY, "--model.max_seq_len", "32", "--data.path", str(corpus),
                 "--data.cache_dir", str(tmp_path / "cache"), "--data.tokenizer.vocab_size", "1000",
                 "--train.batch_size", "32", "--train.lr", "3e-3", "--train.max_steps", "120", "--train.warmup_steps", "10",
                 "--eval.every", "60", "--eval.batches", "4", "--log.run_dir", str(span)]) == 0
    rows = [json.loads(r) for r in (span / "metrics.jsonl").read_text().splitlines()]
    val = [r["loss"] for r in rows if r["split"] == "val"]
    assert val[-1] < 0.7 * math.log(1000), val  # a uniform guess over the vocabulary scores log(V)
    capsys.readouterr()
    # its weights and tokenizer start a translation run
    train = write_tsv(tmp_path / "train.tsv", [(s, s) for s in lines[:200]])
    run = tmp_path / "run"
    assert main(["train", "--task", "seq2seq", "--log.progress", "false", "--log.trackers", "[]",
                 "--seq2seq.init_from", str(span), "--seq2seq.train", str(train), "--seq2seq.dev", str(train),
                 "--seq2seq.max_length", "32", "--train.max_steps", "1", "--train.warmup_steps", "0",
                 "--seq2seq.eval_bleu", "false", "--seq2seq.samples", "0", "--log.run_dir", str(run)]) == 0
    assert (run / "tokenizer.json").read_text() == (span / "tokenizer.json").read_text()
    # refused: a run of another kind as init_from
    assert main(["train", "--task", "seq2seq", "--seq2seq.init_from", str(tmp_path / "missing"),
                 "--seq2seq.train", str(train), "--seq2seq.dev", str(train)]) == 2


@pytest.mark.slow
def test_separate_vocabularies_give_the_encoder_its_own_embedding(tmp_path, capsys):
    train = write_tsv(tmp_path / "train.tsv", number_pairs(300, 0))
    run = tmp_path / "run"
    assert main(["train", "--task", "seq2seq", *SEQ2SEQ_TINY, "--seq2seq.train", str(train), "--seq2seq.dev", str(train),
                 "--seq2seq.source_vocab_size", "300", "--data.tokenizer.vocab_size", "320", "--train.max_steps", "3",
                 "--train.warmup_steps", "0", "--seq2seq.eval_bleu", "false", "--seq2seq.samples", "0",
                 "--seq2seq.beam_size", "1", "--log.run_dir", str(run)]) == 0
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.runs import load_run

    model, tok, cfg = load_run(run)
    src_tok = load_tokenizer(run / "source_tokenizer.json")
    assert model.encoder.tok_emb is not model.decoder.tok_emb
    assert model.encoder.tok_emb.num_embeddings == cfg.seq2seq.source_vocab_size == 300
    assert model.decoder.tok_emb.num_embeddings == cfg.model.vocab_size >= tok.get_vocab_size()
    assert not any("zwei" in t for t in src_tok.get_vocab())  # each side has only its own words
    assert not any("two" in t for t in tok.get_vocab()) and any("two" in t for t in src_tok.get_vocab())
    capsys.readouterr()
    src = tmp_path / "in.txt"
    src.write_text("One two three.\n\nFour.\n")
    out = tmp_path / "out.txt"
    assert main(["translate", "--checkpoint", str(run), "--input", str(src), "--output", str(out)]) == 0
    lines = out.read_text(encoding="utf-8").split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""


def test_averaging_more_checkpoints_than_are_kept_is_refused():
    from lmforge.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="seq2seq.average_last = 5 needs train.keep_checkpoints >= 5 \\(got 2\\)"):
        load_config(None, {"task": "seq2seq", "seq2seq.average_last": "5", "train.keep_checkpoints": "2"})
