"""The training loop end to end: it learns, resumes exactly, accumulates exactly, stops when told,
and leaves a run directory from which the run can be repeated."""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from helpers import FixedBatches, read_metrics, shakespeare_text, tiny_config, tiny_overrides, write_corpus
from lmforge.cli import main
from lmforge.config import load_config, read_yaml
from lmforge.losses import IGNORE_INDEX
from lmforge.optim import lr_at
from lmforge.tasks import make_task
from lmforge.tasks.clm import CausalLM
from lmforge.train.checkpoint import find_resume, load_checkpoint
from lmforge.train.loop import train


def ckpt(run_dir, step):
    return run_dir / "checkpoints" / f"step_{step:08d}.pt"


def unigram_entropy(ids) -> float:
    counts = np.array(list(Counter(ids.tolist()).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.slow
def test_tiny_model_learns_shakespeare(tmp_path):
    """A 2-layer char model trained for 150 steps beats every model that ignores context.

    The bound: a model that ignores context predicts one fixed distribution q for every position; its
    cross-entropy on the val targets is H(p) + KL(p || q) >= H(p), where p is the empirical unigram
    distribution of those targets. So the unigram entropy of the val split (about 3.3 nats here) is
    the best any context-free model can score, while an untrained model scores about ln(vocab) = 4.2.
    Getting more than 0.3 nats below the bound requires using the context.
    """
    corpus = write_corpus(tmp_path, shakespeare_text(200_000))
    cfg = tiny_config(tmp_path, corpus, model__n_layer=2, model__n_head=4, model__d_model=64,
                      model__max_seq_len=64, train__batch_size=32, train__max_steps=150, train__lr=5e-3,
                      train__min_lr=3e-4, train__warmup_steps=5, train__weight_decay=0.0, eval__batches=0,
                      eval__batch_size=64, log__every=50)

    task = make_task(copy.deepcopy(cfg))
    task.setup()
    val = np.asarray(task.data.val)
    bound = unigram_entropy(val[1:])  # exactly the targets an evaluation scores
    vocab = task.data.tokenizer.get_vocab_size()
    assert bound < math.log(vocab) - 0.5

    torch.manual_seed(0)
    untrained = task.evaluate(task.build_model().eval(), lambda b: b)
    assert untrained["tokens"] == len(val) - 1
    assert untrained["loss"] > bound + 0.5
    assert untrained["loss"] == pytest.approx(math.log(vocab), abs=0.1)

    result = train(cfg)
    assert result.step == 150
    assert result.last_val["tokens"] == len(val) - 1
    assert result.last_val["loss"] < bound - 0.3, (result.last_val, bound)


@pytest.mark.parametrize("optimizer,schedule", [("adamw", "cosine"), ("muon", "wsd")])
@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path, capsys, optimizer, schedule):
    n = 6
    corpus = write_corpus(tmp_path, shakespeare_text(30_000))
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    cfg = tiny_config(tmp_path, corpus, model__dropout=0.2, train__max_steps=2 * n, train__checkpoint_every=n,
                      train__keep_checkpoints=10, train__warmup_steps=2, eval__every=n, log__run_dir=str(run_a),
                      train__optimizer=optimizer, train__schedule=schedule)
    train(cfg)
    assert ckpt(run_a, n).is_file() and ckpt(run_a, 2 * n).is_file()

    # B: the same run, interrupted right after step n's checkpoint (a crash: later outputs remain)
    shutil.copytree(run_a, run_b)
    for p in (run_b / "checkpoints").glob("step_*.pt"):
        if int(p.stem.split("_")[1]) > n:
            p.unlink()
    assert main(["pretrain", "--resume", "auto", "--log.run_dir", str(run_b)]) == 0
    assert f"from step_{n:08d}.pt (step {n})" in capsys.readouterr().out

    a_rows, b_rows = read_metrics(run_a, "train"), read_metrics(run_b, "train")
    assert [r["step"] for r in b_rows] == list(range(1, 2 * n + 1))  # no duplicated or lost history
    for ra, rb in zip(a_rows[n:], b_rows[n:]):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6), ra["step"]
        assert rb["lr"] == pytest.approx(ra["lr"], abs=1e-12)
    assert [r["loss"] for r in read_metrics(run_b, "val")] == pytest.approx(
        [r["loss"] for r in read_metrics(run_a, "val")], abs=1e-6)

    wa, wb = load_checkpoint(ckpt(run_a, 2 * n))["model"], load_checkpoint(ckpt(run_b, 2 * n))["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.slow
def test_resume_can_extend_max_steps(tmp_path):
    """--resume with a longer train.max_steps continues the saved run from its own config (its warmup_steps,
    not the default 50)."""
    corpus = write_corpus(tmp_path, shakespeare_text(30_000))
    run = tmp_path / "run"
    train(tiny_config(tmp_path, corpus, train__max_steps=4, train__warmup_steps=2))
    assert main(["pretrain", "--resume", "auto", "--log.run_dir", str(run), "--train.max_steps", "7"]) == 0
    assert [r["step"] for r in read_metrics(run, "train")] == list(range(1, 8))
    assert ckpt(run, 7).is_file()
    assert read_yaml(run / "config.yaml")["train"]["max_steps"] == 7


def extend_run(tmp_path, monkeypatch, *options: str) -> tuple[list[float], list[float], dict]:
    """A 4-step cosine run (2 warmup steps) resumed to 10 steps through the CLI with `options`; (the logged lr of
    every step, the planned schedule curves.png draws, the saved train section)."""
    from lmforge.train import tracking

    drawn = []
    real_plot = tracking.plot_curves
    monkeypatch.setattr(tracking, "plot_curves", lambda run_dir, schedule=None, metric="loss":
                        drawn.append(schedule) or real_plot(run_dir, schedule, metric))
    corpus = write_corpus(tmp_path, shakespeare_text(30_000))
    run = tmp_path / "run"
    train(tiny_config(tmp_path, corpus, train__max_steps=4, train__warmup_steps=2))
    assert main(["pretrain", "--resume", "auto", "--log.run_dir", str(run), "--train.max_steps", "10", *options]) == 0
    lrs = [r["lr"] for r in read_metrics(run, "train")]
    assert len(lrs) == 10
    return lrs, drawn[-1], read_yaml(run / "config.yaml")["train"]


@pytest.mark.slow
def test_extending_a_run_keeps_its_schedule_and_says_so(tmp_path, monkeypatch, capsys):
    """The steps past the first run's 4 run at the lr its schedule ended with (min_lr), not a schedule
    recomputed over 10 steps; curves.png draws the schedule the run followed; one line says what happens."""
    lrs, drawn, saved = extend_run(tmp_path, monkeypatch)
    assert lrs[4:] == pytest.approx([1e-4] * 6) and lrs[3] == pytest.approx(1e-4)
    assert drawn == pytest.approx(lrs, rel=1e-9)
    assert saved["schedule_steps"] == 4 and saved["max_steps"] == 10
    assert (f"lmforge: extending run {tmp_path / 'run'} from 4 to 10 steps: the schedule keeps its horizon of 4 "
            "steps; steps 5-10 run at min_lr 0.0001 (train.schedule_restart true starts a new warmup and decay)"
            in capsys.readouterr().out.splitlines())


@pytest.mark.slow
def test_extending_with_schedule_restart_warms_up_again(tmp_path, monkeypatch, capsys):
    lrs, drawn, saved = extend_run(tmp_path, monkeypatch, "--train.schedule_restart", "true")
    assert lrs[:4] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-4])  # the first run's schedule: warmup 2, cosine to 4
    assert lrs[4:6] == pytest.approx([5e-4, 1e-3])  # a new warmup of 2 steps from the resume step
    assert lrs[-1] == pytest.approx(1e-4) and all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    assert drawn == pytest.approx(lrs, rel=1e-9)
    assert saved["schedule_restarts"] == [[4, 10]]
    assert "train.schedule_restart starts a new schedule at step 5: 2 warmup steps" in capsys.readouterr().out


@pytest.mark.slow
def test_smoke_run_shorter_than_its_warmup_trains(tmp_path, capsys):
    """`pretrain --train.max_steps 2` with the default 50 warmup steps trains, saying the warmup was clamped;
    config.yaml records the warmup it used."""
    corpus = write_corpus(tmp_path, shakespeare_text(30_000))
    over = tiny_overrides(tmp_path, corpus, **{"train.max_steps": 2})
    del over["train.warmup_steps"]  # the default, 50
    assert main(["pretrain", *(a for k, v in over.items() for a in (f"--{k}", str(v)))]) == 0
    assert ("lmforge: note: train.warmup_steps = 50 is not below the schedule's 2 steps; warming up for 0 steps "
            "(a tenth of them, rounded down) instead") in capsys.readouterr().out.splitlines()
    assert [r["step"] for r in read_metrics(tmp_path / "run", "train")] == [1, 2]
    assert read_yaml(tmp_path / "run" / "config.yaml")["train"]["warmup_steps"] == 0


@pytest.mark.slow
def test_accumulation_equals_big_batch(tmp_path, monkeypatch):
    """k micro-batches with different numbers of ignored targets give the gradient of one batch k times
    larger, averaged over its real targets - not the mean of the k per-micro-batch means."""
    k, b, t, vocab_used = 3, 2, 16, 20
    g = torch.Generator().manual_seed(0)
    micro = []
    for i, n_ignored in enumerate((29, 0, 11)):  # 3, 32 and 21 real targets
        inp = torch.randint(vocab_used, (b, t), generator=g)
        tgt = torch.randint(vocab_used, (b, t), generator=g)
        tgt.view(-1)[torch.randperm(b * t, generator=g)[:n_ignored]] = IGNORE_INDEX
        micro.append({"input": inp, "target": tgt})
    big = {key: torch.cat([m[key] for m in micro]) for key in ("input", "target")}

    grads, models = [], []
    real_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, *args, **kwargs):
        params = list(params)
        grads.append([p.grad.detach().clone() for p in params])
        return real_clip(params, *args, **kwargs)

    real_build = CausalLM.build_model

    def recording_build(self, pretrained=False):
        model = real_build(self, pretrained)
        models.append(copy.deepcopy(model))
        return model

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    monkeypatch.setattr(CausalLM, "build_model", recording_build)
    corpus = write_corpus(tmp_path, shakespeare_text(30_000))
    # Adam's first step is lr * g / (|g| + eps): with a large eps the weights move in proportion to
    # the gradient, so the weights after one step tell gradients apart, not just their signs.
    common = dict(train__max_steps=1, train__warmup_steps=0, train__grad_clip=0.0, train__weight_decay=0.0,
                  train__lr=0.5, train__min_lr=0.5, train__eps=1.0, model__dropout=0.0, model__max_seq_len=t,
                  eval__batches=1)
    monkeypatch.setattr(CausalLM, "train_batches", lambda self, seed: FixedBatches(micro))
    train(tiny_config(tmp_path, corpus, train__grad_accum=k, train__batch_size=b, log__run_dir=str(tmp_path / "acc"),
                      **common))
    monkeypatch.setattr(CausalLM, "train_batches", lambda self, seed: FixedBatches([big]))
    train(tiny_config(tmp_path, corpus, train__grad_accum=1, train__batch_size=k * b,
                      log__run_dir=str(tmp_path / "big"), **common))
    assert len(grads) == 2 and len(models) == 2

    # oracle: one forward over the concatenated batch, mean cross-entropy over the real targets
    model = models[0]
    model.train()
    logits = model(big["input"])
    loss = F.cross_entropy(logits.flatten(0, 1), big["target"].flatten(), ignore_index=IGNORE_INDEX)
    params = list(model.parameters())
    oracle = torch.autograd.grad(loss, params)
    # the naive rule: the mean of the per-micro-batch means
    naive_loss = sum(F.cross_entropy(model(m["input"]).flatten(0, 1), m["target"].flatten(),
                                     ignore_index=IGNORE_INDEX) for m in micro) / k
    naive = torch.autograd.grad(naive_loss, params)

    for acc, whole, want, bad in zip(grads[0], grads[1], oracle, naive):
        torch.testing.assert_close(acc, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(whole, want, atol=1e-5, rtol=0)
    assert max(float((w - n).abs().max()) for w, n in zip(oracle, naive)) > 1e-2  # the test can tell them apart

    assert read_metrics(tmp_path / "acc", "train")[0]["loss"] == pytest.approx(loss.item(), abs=1e-5)
    wa = load_checkpoint(ckpt(tmp_path / "acc", 1))["model"]
    wb = load_checkpoint(ckpt(tmp_path / "big", 1))["model"]
    moved = 0.0
    for name, p0 in models[0].state_dict().items():
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=0)
        moved = max(moved, float((wa[name] - p0).abs().max()))
    assert moved > 1e-3  # the step really moved the weights


@pytest.mark.slow
def test_chunked_loss_in_a_run_equals_unchunked(tmp_path, monkeypatch):
    """The loop through the fused chunked loss (forced to 8-row chunks) with label smoothing, z-loss and
    soft-capping trains exactly like the plain logits + cross-entropy."""
    from lmforge import losses

    calls = []
    real_apply = losses._LinearCrossEntropy.apply
    monkeypatch.setattr(losses._LinearCrossEntropy, "apply", lambda *a: calls.append(1) or real_apply(*a))
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", {"cpu": 1, "cuda": 1})
    monkeypatch.setattr(losses, "MIN_CHUNK_ROWS", 8)
    corpus = write_corpus(tmp_path, shakespeare_text(30_000))
    runs = {}
    for chunked in (True, False):
        calls.clear()
        run = tmp_path / f"chunked-{chunked}"
        train(tiny_config(tmp_path, corpus, loss__chunked=chunked, loss__label_smoothing=0.1, loss__z_loss=1e-3,
                          loss__softcap=5.0, train__max_steps=5, eval__every=5, log__run_dir=str(run)))
        runs[chunked] = run
        assert bool(calls) == chunked
    for split in ("train", "val"):
        assert [r["loss"] for r in read_metrics(runs[True], split)] == pytest.approx(
            [r["loss"] for r in read_metrics(runs[False], split)], abs=1e-5)
    wa, wb = load_checkpoint(ckpt(runs[True], 5))["model"], load_checkpoint(ckpt(runs[False], 5))["model"]
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_resume_auto_skips_damaged_checkpoint(tmp_path, capsys):
    corpus = write_corpus(tmp_path, shakespeare_text(30_000))
    run = tmp_path / "run"
    train(tiny_config(tmp_path, corpus, train__max_steps=4, train__checkpoint_every=2, train__keep_checkpoints=5))
    good = load_checkpoint(ckpt(run, 2))
    ckpt(run, 4).write_bytes(b"not a checkpoint" * 100)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "split": "tr')  # a crash in the middle of a write
    capsys.readouterr()

    run_dir, (path, state) = find_resume("auto", tmp_path / "runs", run)
    assert (run_dir, path, state["step"]) == (run, ckpt(run, 2), 2)
    err = capsys.readouterr().err
    assert "set aside as step_00000004.pt.damaged" in err and err.count("\n") == 1
    assert (run / "checkpoints" / "step_00000004.pt.damaged").is_file()  # kept, not deleted
    # auto without a run directory finds the newest run under out_dir
    run_dir, (path, _) = find_resume("auto", tmp_path, None)
    assert (run_dir, path) == (run, ckpt(run, 2))
    for name, value in good["model"].items():
        assert torch.equal(state["model"][name], value)

    assert main(["pretrain", "--resume", "auto", "--log.run_dir", str(run)]) == 0
    out = capsys.readouterr()
    assert f"from {ckpt(run, 2).name} (step 2)" in out.out
    assert load_checkpoint(ckpt(run, 4))["step"] == 4  # a good step 4 beside the damaged one
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2, 3, 4]

    # every checkpoint damaged: --resume auto says so, sets them aside and starts the run over
    for step in (2, 4):
        ckpt(run, step).write_bytes(b"\0" * 64)
    assert main(["pretrain", "--resume", "auto", "--log.run_dir", str(run)]) == 0
    out = capsys.readouterr()
    assert out.err.count("set aside") == 2 and "starting the run from step 0" in out.out
    assert load_checkpoint(ckpt(run, 4))["step"] == 4 and load_checkpoint(ckpt(run, 2))["step"] == 2
    # naming the run itself (not auto) still refuses a run whose checkpoints are all damaged
    for step in (2, 4):
        ckpt(run, step).write_bytes(b"\0" * 64)
    assert main(["pretrain", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge: error: checkpoint: none of the 2 checkpoints")


@pytest.mark.slow
def test_early_stopping_on_patience(tmp_path, monkeypatch):
    # scripted val losses: improvements at evals 1, 2, 4; evals 3, 5, 6 do not improve -> with
    # patience 2 the run stops after eval 6 (the counter resets at eval 4)
    losses = iter([3.0, 2.9, 2.95, 2.8, 2.85, 2.86, 2.0, 2.0, 2.0])
    monkeypatch.setattr(CausalLM, "evaluate", lambda self, model, to_device: {"loss": next(losses), "ppl": 1.0, "tokens": 1})
    corpus = write_corpus(tmp_path, shakespeare_text(30_000))
    run = tmp_path / "run"
    result = train(tiny_config(tmp_path, corpus, train__max_steps=50, eval__every=1, eval__patience=2))
    assert result.step == 6
    assert result.best == 2.8
    assert [r["step"] for r in read_metrics(run, "val")] == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in (run / "checkpoints").glob("*.pt")] == [ckpt(run, 6).name]
    with safe_open(run / "model.safetensors", "pt") as f:
        assert f.metadata()["step"] == "4"  # the best weights, not the last


@pytest.mark.slow
def test_max_time_stops_with_checkpoint_and_resumes(tmp_path, capsys):
    corpus = write_corpus(tmp_path, shakespeare_text(30_000))
    run = tmp_path / "run"
    result = train(tiny_config(tmp_path, corpus, train__max_steps=6, train__max_time=1e-6))
    assert result.step == 1
    assert "time budget" in capsys.readouterr().out
    assert load_checkpoint(ckpt(run, 1))["step"] == 1
    assert [r["step"] for r in read_metrics(run, "val")] == [1]
    assert main(["pretrain", "--resume", "auto", "--log.run_dir", str(run), "--train.max_time", "0"]) == 0
    assert [r["step"] for r in read_metrics(run, "train")] == list(range(1, 7))


@pytest.mark.slow
def test_run_directory_and_repeat_from_resolved_config(tmp_path):
    corpus = write_corpus(tmp_path, shakespeare_text(30_000))
    run = tmp_path / "run"
    cfg = tiny_config(tmp_path, corpus, train__max_steps=4, train__warmup_steps=1, eval__every=2,
                      log__trackers=["tensorboard"], model__pos="rope", model__norm="rmsnorm")
    first = train(cfg)

    for name in ("config.yaml", "tokenizer.json", "model.safetensors", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    assert first.plot == run / "curves.png"

    # the logged learning rate of step s is the schedule's value for the 0-based step s - 1
    rows = read_metrics(run, "train")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows] == pytest.approx([lr_at(s - 1, cfg.train) for s in range(1, 5)], rel=1e-9)

    # the saved config is the resolved one (vocabulary size filled in) and loads back to the same Config
    saved = load_config(base=read_yaml(run / "config.yaml"))
    assert saved == cfg
    assert saved.model.vocab_size > 0

    second = train(load_config(base=read_yaml(run / "config.yaml"), overrides={"log.run_dir": str(tmp_path / "again")}))
    assert second.best == pytest.approx(first.best, abs=1e-6)
    assert read_metrics(tmp_path / "again", "train")[-1]["loss"] == pytest.approx(rows[-1]["loss"], abs=1e-6)
    assert (tmp_path / "again" / "tokenizer.json").read_text() == (run / "tokenizer.json").read_text()


@pytest.mark.slow
def test_compile_failure_falls_back_to_eager(tmp_path, corpus, monkeypatch):
    """A torch.compile that fails at the first call gives a warning and the same run as eager."""
    import warnings

    import torch

    from lmforge.train.loop import train

    eager = train(tiny_config(tmp_path / "eager", corpus))

    def broken_compile(fn, *args, **kwargs):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler for inductor")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = train(tiny_config(tmp_path / "compiled", corpus, train__compile=True))
    assert any("torch.compile failed" in str(w.message) and "eager" in str(w.message) for w in caught)
    eager_losses = [r["loss"] for r in read_metrics(eager.run_dir, "train")]
    assert [r["loss"] for r in read_metrics(fallback.run_dir, "train")] == eager_losses


def test_bf16_on_cpu_without_native_support_warns(monkeypatch):
    import warnings

    import torch

    from lmforge.train import precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = precision.resolve_precision("bf16", cpu)
    assert chosen.dtype == torch.bfloat16 and any("slower than fp32" in str(w.message) for w in caught)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        precision.resolve_precision("bf16", cpu)
    assert not caught


@pytest.mark.slow
def test_resume_from_another_architecture_is_one_line_error(tmp_path, corpus):
    """A checkpoint whose weights do not fit the configured model names the first bad key and both shapes."""
    from lmforge.errors import UserError
    from lmforge.train.checkpoint import find_resume
    from lmforge.train.loop import train

    first = train(tiny_config(tmp_path / "a", corpus, train__checkpoint_every=2))
    _, resume = find_resume(str(first.run_dir), tmp_path, None)
    wider = tiny_config(tmp_path / "b", corpus, model__d_model=64)
    with pytest.raises(UserError, match=r"weight '.*' has shape \(\d+, 32\) but the model expects \(\d+, 64\)"):
        train(wider, resume)
    assert not (tmp_path / "b" / "run").exists()


@pytest.mark.slow
def test_default_job_runs_on_the_embedded_corpus(tmp_path):
    """`lmforge pretrain` with no options (what `make run` does), cut to 3 steps: the embedded King James
    Bible is found, a BPE tokenizer of the default size is trained, and the run directory is complete."""
    from lmforge.cli import main

    out = tmp_path / "runs"
    rc = main(["pretrain", "--train.max_steps", "3", "--train.warmup_steps", "1", "--eval.batches", "1",
               "--data.cache_dir", str(tmp_path / "cache"), "--log.out_dir", str(out), "--log.samples", "1",
               "--log.sample_tokens", "5", "--log.trackers", "[]"])
    assert rc == 0
    (run,) = out.iterdir()
    from lmforge.config import load_config, read_yaml

    cfg = load_config(base=read_yaml(run / "config.yaml"))
    assert cfg.data.path is None and cfg.model.vocab_size == cfg.data.tokenizer.vocab_size == 4096
    assert (run / "model.safetensors").is_file() and (run / "curves.png").is_file()


@pytest.mark.slow
def test_packed_clm_run_starts_windows_at_documents_and_scores_every_val_target(tmp_path):
    text = shakespeare_text(3000)
    docs = [text[i:i + n] for i, n in zip(range(0, 3000, 97), [5, 40, 13, 70, 22] * 7)]
    corpus = write_corpus(tmp_path, "".join(json.dumps({"text": d}) + "\n" for d in docs), "docs.jsonl")
    cfg = tiny_config(tmp_path, corpus, data__pack=True, train__max_steps=2, eval__batches=0)
    task = make_task(copy.deepcopy(cfg))
    task.setup()
    batches, eos = task.train_batches(0), task.pack_eos
    batch = next(batches)
    assert torch.equal(batch["doc_ids"], (batch["input"] == eos).cumsum(1))
    allowed = {tuple(batches.tokens[s:s + 16]) for s in batches.starts}  # document starts and pieces
    assert all(tuple(w) in allowed for w in batch["input"].tolist())
    tokens = batches.tokens
    assert (tokens[batches.starts] == eos).sum() == (tokens[:len(tokens) - 16] == eos).sum()  # every document
    result = train(cfg)
    assert result.last_val["tokens"] == len(task.data.val) - 1 and math.isfinite(result.last_val["loss"])
