"""The encoder and masked-LM pre-training: masking statistics, whole words, NSP pairs, resume, a
padding mask that changes nothing at real tokens, and a tiny model that learns from context."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import read_metrics, shakespeare_text, synthetic_text, tiny_config, write_corpus

from lmforge.cli import main
from lmforge.config import MLMConfig
from lmforge.data.masking import Masker, MLMBatches, MLMExamples, special_ids
from lmforge.data.tokenizer import train_tokenizer
from lmforge.losses import IGNORE_INDEX
from lmforge.model.config import PRESETS, ModelConfig
from lmforge.model.transformer import GPT, MaskedLM
from lmforge.tasks import make_task
from lmforge.train.loop import train

MLM_CHAR = {"task": "mlm", "data.tokenizer.special_tokens": ["[CLS]", "[SEP]", "[MASK]"]}


@pytest.fixture(scope="module")
def wordpiece():
    return train_tokenizer([shakespeare_text(300_000)], "wordpiece", 2000, [], lowercase=True)


def stream(tok, n_chars=200_000) -> np.ndarray:
    return np.asarray(tok.encode(shakespeare_text(n_chars), add_special_tokens=False).ids, dtype=np.int64)


def test_dynamic_masking_follows_80_10_10(wordpiece):
    ids = special_ids(wordpiece, "test")
    masker = Masker(wordpiece, MLMConfig(), ids, "test")
    tokens = torch.from_numpy(stream(wordpiece)[:64 * 512].reshape(64, 512))
    tokens[:, 0], tokens[:, -1] = ids.cls, ids.sep
    inputs, target = masker(tokens, torch.Generator().manual_seed(0))

    chosen = target != IGNORE_INDEX
    ordinary = ~masker.special[tokens]
    assert not chosen[~ordinary].any()  # [CLS] and [SEP] are never targets
    assert torch.equal(target[chosen], tokens[chosen])
    assert torch.equal(inputs[~chosen], tokens[~chosen])  # only chosen positions change
    n = int(chosen.sum())
    assert n / int(ordinary.sum()) == pytest.approx(0.15, abs=0.01)  # 32k positions: sd of the rate ~0.002
    as_mask = (inputs[chosen] == ids.mask).float().mean()
    kept = (inputs[chosen] == tokens[chosen]).float().mean()
    assert as_mask == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1, abs=0.02) or kept == pytest.approx(0.1 + 1 / len(masker.random_pool), abs=0.02)
    replaced = inputs[chosen & (inputs != ids.mask) & (inputs != tokens)]
    assert len(replaced) / n == pytest.approx(0.1, abs=0.02)
    assert not masker.special[replaced].any()  # random replacements are ordinary tokens

    again, _ = masker(tokens, torch.Generator().manual_seed(1))
    assert not torch.equal(again, inputs)  # dynamic: another draw masks other positions


def test_whole_word_masking_masks_every_piece_of_a_word(wordpiece):
    ids = special_ids(wordpiece, "test")
    masker = Masker(wordpiece, MLMConfig(whole_word=True), ids, "test")
    tokens = torch.from_numpy(stream(wordpiece)[:32 * 256].reshape(32, 256))
    _, target = masker(tokens, torch.Generator().manual_seed(0))
    chosen = target != IGNORE_INDEX
    pieces = [wordpiece.id_to_token(int(i)) for i in tokens.flatten()]
    continuation = torch.tensor([p.startswith("##") for p in pieces]).view_as(tokens)
    continuation[:, 0] = False
    assert continuation.sum() > 200  # the corpus has many multi-piece words at this vocabulary
    # a continuation piece is chosen exactly when the piece before it is
    assert torch.equal(chosen[:, 1:][continuation[:, 1:]], chosen[:, :-1][continuation[:, 1:]])
    assert chosen.float().mean() == pytest.approx(0.15, abs=0.02)


def test_next_sentence_pairs(wordpiece):
    ids = special_ids(wordpiece, "test")
    no_masking = MLMConfig(mask_prob=1e-9)
    tokens = stream(wordpiece)
    examples = MLMExamples(tokens, 48, ids, Masker(wordpiece, no_masking, ids, "test"), nsp=True)
    starts = np.arange(0, 200 * 100, 100)
    batch = examples(starts, torch.Generator().manual_seed(0))
    x, seg, label = batch["input"], batch["segments"], batch["nsp_label"]
    assert x.shape == seg.shape == (200, 48)
    assert 0.35 < label.float().mean() < 0.65
    for row in range(200):
        assert x[row, 0] == ids.cls and x[row, -1] == ids.sep
        seps = (x[row] == ids.sep).nonzero().flatten().tolist()
        assert len(seps) == 2
        first = seps[0]
        assert seg[row, :first + 1].eq(0).all() and seg[row, first + 1:].eq(1).all()
        a, b = x[row, 1:first].numpy(), x[row, first + 1:-1].numpy()
        s = starts[row]
        assert np.array_equal(a, tokens[s:s + len(a)])  # A is the text at the window's start
        follows = np.array_equal(b, tokens[s + len(a):s + len(a) + len(b)])
        assert follows == (label[row] == 0), row  # label 0: B is the text right after A


def test_batches_resume_exactly(wordpiece):
    ids = special_ids(wordpiece, "test")
    examples = MLMExamples(stream(wordpiece), 32, ids, Masker(wordpiece, MLMConfig(), ids, "test"), nsp=True)
    a = MLMBatches(examples, 4, seed=3)
    next(a)
    state = copy.deepcopy(a.state_dict())
    expected = next(a)
    b = MLMBatches(examples, 4, seed=99)
    b.load_state_dict(state)
    got = next(b)
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    # two ranks keep disjoint halves of the global batch one process would draw
    whole = next(MLMBatches(examples, 4, seed=5))
    halves = [next(MLMBatches(examples, 2, seed=5, shard=(r, 2))) for r in range(2)]
    for k in whole:
        assert torch.equal(torch.cat([h[k] for h in halves]), whole[k]), k


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_padding_changes_nothing_at_real_tokens(norm_position):
    cfg = ModelConfig(**{**PRESETS["bert-tiny"], "n_layer": 2, "d_model": 64, "n_head": 4,
                         "norm_position": norm_position}, vocab_size=50)
    torch.manual_seed(0)
    model = MaskedLM(cfg).eval()
    short, long = torch.randint(5, 50, (1, 7)), torch.randint(5, 50, (1, 12))
    padded = torch.zeros(2, 12, dtype=torch.long)
    padded[0, :7], padded[1] = short[0], long[0]
    pad_mask = padded != 0
    pad_mask[1] = True
    segments = torch.zeros_like(padded)
    with torch.no_grad():
        together = model(padded, segments, pad_mask)
        alone = [model(short), model(long)]
        padded[0, 7:] = 17  # other padding content: no effect either
        changed_pad = model(padded, segments, pad_mask)
    torch.testing.assert_close(together[0, :7], alone[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[1], alone[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(changed_pad[0, :7], together[0, :7], atol=1e-6, rtol=1e-6)


def test_encoder_sees_both_sides_and_decoder_only_the_past():
    cfg = ModelConfig(n_layer=1, n_head=2, d_model=32, vocab_size=40, max_seq_len=16)
    torch.manual_seed(0)
    x = torch.randint(0, 40, (1, 10))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 40
    with torch.no_grad():
        enc, dec = MaskedLM(cfg).eval(), GPT(cfg).eval()
        assert not torch.allclose(enc.features(x)[0, 0], enc.features(y)[0, 0])
        torch.testing.assert_close(dec.features(x)[0, :-1], dec.features(y)[0, :-1])


def test_post_norm_block_matches_its_formula():
    cfg = ModelConfig(**{**PRESETS["bert-tiny"], "n_layer": 1, "d_model": 32, "n_head": 2}, vocab_size=20)
    block = MaskedLM(cfg).blocks[0].eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        h = block.norm1(x + block.attn(x))
        expected = block.norm2(h + block.mlp(h))
        torch.testing.assert_close(block(x), expected)
        q, k, v = block.attn.qkv(x).split(32, dim=-1)
        heads = lambda t: t.view(2, 5, 2, 16).transpose(1, 2)  # noqa: E731
        att = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / 4.0, dim=-1) @ heads(v)  # no causal mask
        torch.testing.assert_close(block.attn(x), block.attn.proj(att.transpose(1, 2).reshape(2, 5, 32)))


def test_loss_is_mlm_plus_nsp_weighted_by_the_expected_masked_count(tmp_path):
    corpus = write_corpus(tmp_path, shakespeare_text(40_000))
    cfg = tiny_config(tmp_path, corpus, **{k.replace(".", "__"): v for k, v in MLM_CHAR.items()},
                      mlm__nsp=True, model__type_vocab_size=2, model__max_seq_len=32)
    task = make_task(cfg)
    task.setup()
    torch.manual_seed(0)
    model = task.build_model()
    batch = next(task.train_batches(0))
    n = task.count(batch)
    hidden = model.features(batch["input"], segments=batch["segments"])
    logits = model.mlm_head(hidden)
    mlm = F.cross_entropy(logits.flatten(0, 1), batch["target"].flatten(), ignore_index=IGNORE_INDEX)
    nsp = F.cross_entropy(model.nsp_head(torch.tanh(model.pooler(hidden[:, 0]))), batch["nsp_label"])
    per_sequence = 0.15 * (32 - 3)  # the expected masked tokens of a sequence: 15% of its text
    expected = mlm * n + nsp * len(batch["input"]) * per_sequence
    torch.testing.assert_close(task.loss(model, batch), expected)
    assert n / len(batch["input"]) == pytest.approx(per_sequence, rel=0.5)


@pytest.mark.slow
def test_tiny_encoder_learns_from_context(tmp_path):
    """Masked characters of pseudo-English lines: a model without context can do no better than always
    predicting the most frequent target (the unigram accuracy, about 0.14 for ' '); 0.1 above it needs
    the context on both sides."""
    corpus = write_corpus(tmp_path, synthetic_text(100_000))
    cfg = tiny_config(tmp_path, corpus, task="mlm", data__tokenizer__special_tokens=["[CLS]", "[SEP]", "[MASK]"],
                      model__n_layer=2, model__n_head=2, model__d_model=64, model__max_seq_len=32,
                      train__batch_size=32, train__max_steps=120, train__lr=3e-3, train__min_lr=3e-4,
                      train__warmup_steps=10, train__weight_decay=0.0, eval__batches=0, eval__batch_size=64,
                      log__every=40)
    result = train(cfg)
    val = result.last_val
    assert val["tokens"] > 1000
    assert 0.05 < val["unigram_acc"] < 0.3
    assert val["acc"] > val["unigram_acc"] + 0.1, val
    assert read_metrics(result.run_dir, "val")[-1]["acc"] == val["acc"]


@pytest.mark.slow
def test_mlm_resume_equals_uninterrupted(tmp_path, capsys):
    n = 4
    corpus = write_corpus(tmp_path, shakespeare_text(30_000))
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    cfg = tiny_config(tmp_path, corpus, task="mlm", data__tokenizer__special_tokens=["[CLS]", "[SEP]", "[MASK]"],
                      mlm__nsp=True, mlm__whole_word=False, model__type_vocab_size=2, model__norm_position="post",
                      model__pos="learned", model__dropout=0.1, train__max_steps=2 * n, train__checkpoint_every=n,
                      train__keep_checkpoints=10, log__run_dir=str(run_a))
    train(cfg)
    shutil.copytree(run_a, run_b)
    for p in (run_b / "checkpoints").glob("step_*.pt"):
        if int(p.stem.split("_")[1]) > n:
            p.unlink()
    assert main(["pretrain", "--resume", "auto", "--log.run_dir", str(run_b)]) == 0
    capsys.readouterr()
    a, b = read_metrics(run_a, "train"), read_metrics(run_b, "train")
    assert [r["loss"] for r in b[n:]] == pytest.approx([r["loss"] for r in a[n:]], abs=1e-6)


@pytest.mark.parametrize("args,message", [
    (["--task", "mlm"], "task = mlm needs a [MASK] token"),
    (["--task", "mlm", "--data.tokenizer.kind", "wordpiece", "--mlm.mask_token_prob", "0.95"],
     "mlm.mask_token_prob + mlm.random_token_prob = 1.05 must be <= 1"),
    (["--task", "mlm", "--data.tokenizer.kind", "wordpiece", "--mlm.mask_prob", "0"], "mlm.mask_prob"),
])
def test_mlm_config_errors(tmp_path, capsys, args, message):
    assert main(["pretrain", *args, "--log.out_dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_nsp_needs_segments_and_tokenizer_needs_mask(tmp_path, capsys):
    corpus = write_corpus(tmp_path, shakespeare_text(30_000))
    common = ["pretrain", "--task", "mlm", "--data.path", str(corpus), "--data.cache_dir", str(tmp_path / "cache"),
              "--log.run_dir", str(tmp_path / "run"), "--model.max_seq_len", "16", "--train.max_steps", "2",
              "--train.warmup_steps", "0"]
    assert main(common + ["--data.tokenizer.kind", "char", "--data.tokenizer.special_tokens", "[CLS],[SEP],[MASK]",
                          "--mlm.nsp", "true"]) == 2
    assert "mlm.nsp = true needs model.type_vocab_size >= 2" in capsys.readouterr().err
    assert main(common + ["--data.tokenizer.kind", "char", "--data.tokenizer.special_tokens", "<mask>,[CLS]"]) == 2
    assert "needs a [SEP] token" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
