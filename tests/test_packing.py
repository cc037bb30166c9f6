"""Packing: documents (clm) and examples (sft) sharing a row, each attending to itself with positions from
0, give the loss and the gradients of the same documents each in its own padded row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.config import ConfigError, load_config
from lmforge.data.batches import RandomWindows, eval_windows, pack_rows, packed_starts, window_batch
from lmforge.errors import UserError
from lmforge.losses import IGNORE_INDEX
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import GPT, document_positions
from lmforge.tasks.clm import CausalLM
from lmforge.tasks.finetune import Encoded
from lmforge.tasks.sft import SFTTask

EOS = 1
SHAPES = {"rope": dict(pos="rope", n_kv_head=2, norm="rmsnorm", mlp="swiglu", bias=False),
          "learned": dict(pos="learned", norm="layernorm", bias=True, mlp="gelu")}


def gpt(pos: str) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, max_seq_len=40, n_layer=2, n_head=4, d_model=32, init_std=0.2, **SHAPES[pos])
    return GPT(cfg).double()  # float64: the two layouts agree to rounding, far below the tolerance


def loss_and_grads(task, model, batch) -> tuple[float, list[torch.Tensor]]:
    """The loss per target (as the loop divides it) and the gradients of that loss."""
    model.zero_grad()
    loss = task.loss(model, batch) / task.count(batch)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()]


def assert_same(a, b) -> None:
    assert a[0] == pytest.approx(b[0], abs=1e-9)
    for ga, gb in zip(a[1], b[1]):
        torch.testing.assert_close(ga, gb, atol=1e-9, rtol=1e-7)


def clm_task(**extra) -> CausalLM:
    return CausalLM(load_config(overrides={"task": "clm", "data.pack": True, **extra}))


def test_document_positions_restart_at_each_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, -1, -1]])
    assert document_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_packed_clm_window_equals_its_documents_in_padded_rows(pos):
    # a window of the stream: the tail of a cut document, two whole ones, the head of the next; each eos
    # opens the document after it (its input) and is the target of the document before it
    window = torch.tensor([[7, 8, EOS, 4, 5, 6, 9, EOS, 3, 2, EOS, 11, 12, 13]])
    packed = window_batch(window, EOS)
    assert packed["doc_ids"].tolist() == [[0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3]]
    rows = [[7, 8, EOS], [EOS, 4, 5, 6, 9, EOS], [EOS, 3, 2, EOS], [EOS, 11, 12, 13]]  # input + its last target
    width = max(len(r) for r in rows) - 1
    unpacked = {"input": torch.tensor([r[:-1] + [0] * (width - len(r) + 1) for r in rows]),
                "target": torch.tensor([r[1:] + [IGNORE_INDEX] * (width - len(r) + 1) for r in rows])}
    task, model = clm_task(), gpt(pos)
    assert task.count(packed) == task.count(unpacked) == 13
    assert_same(loss_and_grads(task, model, packed), loss_and_grads(task, model, unpacked))


def test_unpacked_path_passes_no_mask():
    model = gpt("rope")
    seen = []
    model.blocks[0].attn.register_forward_pre_hook(lambda m, args: seen.append(args[3]))
    model.features(torch.tensor([[3, 4, 5]]))
    assert seen == [None]  # SDPA's is_causal fast path, as before packing existed


def test_packed_starts_are_document_starts_and_long_document_pieces():
    tokens = np.array([5, 6, EOS, 7, 8, 9, 10, 11, 12, 13, EOS, 4, EOS, 2, 3, 4, 5, 6])
    # documents start at 0, 2, 10, 12; the one at 2 spans 8 tokens: pieces of 3 at 2, 5, 8
    assert packed_starts(tokens, EOS, 3).tolist() == [0, 2, 5, 8, 10, 12]  # 15 leaves too few tokens
    batches = RandomWindows(tokens, 3, 8, seed=0, eos=EOS)
    batch = next(batches)
    assert set(batch["input"][:, 0].tolist()) <= {5, EOS, 9, 12}
    assert torch.equal(batch["doc_ids"], (batch["input"] == EOS).cumsum(1))


def test_packed_eval_windows_still_score_every_target_once():
    tokens = np.random.default_rng(0).integers(0, 6, 101)
    plain = list(eval_windows(tokens, 8, 4))
    packed = list(eval_windows(tokens, 8, 4, eos=EOS))
    for a, b in zip(plain, packed, strict=True):
        assert torch.equal(a["target"], b["target"]) and torch.equal(b["doc_ids"], (b["input"] == EOS).cumsum(1))


def sft_task(pack: bool, max_length: int = 16) -> SFTTask:
    task = SFTTask(load_config(overrides={"task": "sft", "finetune.pack": pack}))
    task.max_length, task.pad_id = max_length, 0  # what setup() takes from the tokenizer and the model
    return task


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_packed_sft_batch_equals_the_padded_batch(pos):
    # prompt + response examples of different lengths; prompt targets are ignored
    rows = []
    for prompt, response in [([3, 4, 5], [6, 7]), ([8] * 6, [9, 10, 11, 12]), ([13], [14, 15, 16]), ([17, 18], [19])]:
        ids = prompt + response + [EOS]
        rows.append(Encoded(ids[:-1], None, [IGNORE_INDEX] * (len(prompt) - 1) + ids[len(prompt):]))
    packed_task, padded_task, model = sft_task(True), sft_task(False), gpt(pos)
    packed, padded = packed_task.collate(rows, [None] * 4), padded_task.collate(rows, [None] * 4)
    assert packed["input"].shape[0] == 2 and padded["input"].shape[0] == 4  # 10 + 5 | 4 + 3 tokens in rows of 16
    assert packed_task.count(packed) == padded_task.count(padded) == 14
    assert_same(loss_and_grads(packed_task, model, packed), loss_and_grads(padded_task, model, padded))


@pytest.mark.parametrize("pack", [False, True])
def test_packed_training_draws_examples_in_a_plain_random_order(pack):
    """Length grouping saves padding; packed rows have none, and alike batches only learn worse."""
    task = sft_task(pack)
    task.train_rows = [Encoded([1] * n, None, [1] * n) for n in range(2, 66)]
    assert task.train_batches(seed=0).group is not pack


def test_pack_rows_first_fit_decreasing():
    assert pack_rows([5, 9, 3, 7, 2], 10) == [[1], [3, 2], [0, 4]]
    assert pack_rows([10, 10], 10) == [[0], [1]]


def test_fp32_packed_equals_padded_to_1e5():
    model = gpt("rope").float()
    window = torch.tensor([[EOS, 4, 5, 6, 9, EOS, 3, 2, EOS, 11, 12, 13]])
    rows = [[EOS, 4, 5, 6, 9, EOS], [EOS, 3, 2, EOS], [EOS, 11, 12, 13]]
    unpacked = {"input": torch.tensor([r[:-1] + [0] * (6 - len(r)) for r in rows]),
                "target": torch.tensor([r[1:] + [IGNORE_INDEX] * (6 - len(r)) for r in rows])}
    task = clm_task()
    a, b = loss_and_grads(task, model, window_batch(window, EOS)), loss_and_grads(task, model, unpacked)
    assert a[0] == pytest.approx(b[0], abs=1e-5)
    for ga, gb in zip(a[1], b[1]):
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("overrides, message", [
    ({"task": "mlm", "data.tokenizer.kind": "wordpiece", "data.pack": True}, "data.pack = true: the mlm task .* cannot pack; data.pack applies to clm"),
    ({"task": "span", "data.pack": True}, "the span task"),
    ({"task": "classify", "finetune.pack": True}, "finetune.pack applies to sft"),
    ({"task": "sft", "data.pack": True}, "data.pack = true: the sft task"),
    ({"task": "clm", "finetune.pack": True}, "finetune.pack = true: the clm task"),
])
def test_pack_where_it_cannot_apply_is_a_one_line_error(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(overrides=overrides)
    assert "\n" not in str(e.value)


def test_pack_is_off_by_default_and_validates_where_it_applies():
    cfg = load_config()
    assert (cfg.data.pack, cfg.finetune.pack) == (False, False)
    assert load_config(overrides={"task": "clm", "data.pack": "true"}).data.pack is True
    assert load_config(overrides={"task": "sft", "finetune.pack": True}).finetune.pack is True


def test_data_pack_without_an_end_of_text_token_is_a_one_line_error(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a few words of text, repeated. " * 40, encoding="utf-8")
    task = CausalLM(load_config(overrides={
        "task": "clm", "data.pack": True, "data.path": str(corpus), "data.tokenizer.kind": "char",
        "data.tokenizer.special_tokens": "[]", "data.cache_dir": str(tmp_path / "cache"), "model.max_seq_len": 16}))
    with pytest.raises(UserError, match="data.pack = true needs an end-of-text token") as e:
        task.setup()
    assert "\n" not in str(e.value)
