"""Training on two processes (gloo on CPU) equals training on one with the same global batch: DDP and
FSDP2 alike, with gradient accumulation, and a sharded checkpoint resumes on another world size.

One run goes through torchrun and the real command line; the others fork two workers from the test
process with torchrun's environment variables, which skips re-importing torch (seconds per run here).
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint.state_dict  # noqa: F401  imported once here, not in every forked worker
import torch.distributed.fsdp  # noqa: F401
import torch.nn.parallel  # noqa: F401
from safetensors.torch import load_file

from helpers import (classify_files, make_base, read_metrics, shakespeare_text, tiny_config, tiny_overrides, write_corpus,
                     write_fixed_perf_cache)
from lmforge.cli import main
from lmforge.config import ConfigError
from lmforge.errors import UserError
from lmforge.train import distributed
from lmforge.runs import export_weights
from lmforge.train.checkpoint import is_sharded, load_checkpoint, sharded_model_state
from lmforge.train.loop import train

SRC = Path(__file__).resolve().parents[1] / "src"
STEPS, PER_RANK, ACCUM = 4, 2, 2
# dropout 0: each rank draws its own dropout masks, so with dropout no two world sizes could agree
COMMON = dict(train__max_steps=STEPS, train__grad_accum=ACCUM, train__checkpoint_every=2, train__keep_checkpoints=10,
              train__warmup_steps=1, eval__every=2, model__dropout=0.0, model__n_layer=2)


def overrides(tmp: Path, corpus: Path, **extra) -> dict:
    return tiny_overrides(tmp, corpus, **{k.replace("__", "."): v for k, v in {**COMMON, **extra}.items()})


def torchrun(tmp: Path, over: dict, nproc: int = 2, *extra_args: str) -> str:
    """`lmforge pretrain` under torchrun with `nproc` processes; returns their stdout."""
    cache = write_fixed_perf_cache(tmp / "perf")  # the workers measure nothing and write nothing under ~
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "LMFORGE_CACHE": str(cache)}
    args = [a for k, v in over.items() for a in (f"--{k}", str(v))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "lmforge", "pretrain", *args, *extra_args]
    done = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def _worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    code = 1
    try:
        code = main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # leave the forked copy of pytest without running its exit handlers


def forked(argv: list[str], nproc: int = 2) -> None:
    """`lmforge <argv>` on `nproc` forked processes that join a process group as torchrun's would."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(rank, nproc, port, argv)) for rank in range(nproc)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.exitcode is None:
            p.kill()
    assert codes == [0] * nproc, codes


def cli(over: dict) -> list[str]:
    return ["pretrain", *[a for k, v in over.items() for a in (f"--{k}", str(v))]]


@pytest.fixture(scope="module")
def corpus2(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), shakespeare_text(30_000))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, corpus2) -> Path:
    """4 steps on 2 ranks with DDP: 2 sequences per rank and micro-batch, 2 micro-batches per step."""
    tmp = tmp_path_factory.mktemp("ddp")
    out = torchrun(tmp, overrides(tmp, corpus2, train__batch_size=PER_RANK, train__parallel="ddp"))
    assert out.count("run directory:") == 1  # only rank 0 reports
    return tmp / "run"


def losses(run: Path, split: str) -> list[float]:
    return [r["loss"] for r in read_metrics(run, split)]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


@pytest.mark.slow  # the module's ddp_run: a torchrun run
def test_ddp_equals_one_process_with_the_same_global_batch(ddp_run, corpus2, tmp_path):
    one = train(tiny_config(tmp_path, corpus2, train__batch_size=2 * PER_RANK, **COMMON)).run_dir
    assert [r["step"] for r in read_metrics(ddp_run, "train")] == list(range(1, STEPS + 1))
    assert losses(ddp_run, "train") == pytest.approx(losses(one, "train"), abs=1e-5)
    assert losses(ddp_run, "val") == pytest.approx(losses(one, "val"), abs=1e-5)
    assert read_metrics(ddp_run, "train")[-1]["tokens"] == read_metrics(one, "train")[-1]["tokens"]
    final = load_checkpoint(one / "checkpoints" / f"step_{STEPS:08d}.pt")["model"]
    assert_same_weights(sharded_model_state(step_dir(ddp_run, STEPS)), final)

    # only rank 0 wrote: the run directory holds one run's files, the checkpoints are DCP directories
    assert sorted(p.name for p in ddp_run.iterdir()) == sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in (ddp_run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert all(is_sharded(p) for p in (ddp_run / "checkpoints").iterdir())

    # the consolidated weights are what a one-process run would have written
    exported = export_weights(step_dir(ddp_run, STEPS), tmp_path / "export.safetensors")
    weights = load_file(exported)
    assert_same_weights(weights, {k: v for k, v in final.items() if k in weights})
    best = load_file(ddp_run / "model.safetensors")
    assert_same_weights(best, load_file(one / "model.safetensors"))


@pytest.mark.slow  # the module's ddp_run: a torchrun run
def test_fsdp_equals_ddp(ddp_run, corpus2, tmp_path):
    forked(cli(overrides(tmp_path, corpus2, train__batch_size=PER_RANK, train__parallel="fsdp")))
    fsdp = tmp_path / "run"
    assert losses(fsdp, "train") == pytest.approx(losses(ddp_run, "train"), abs=1e-5)
    assert losses(fsdp, "val") == pytest.approx(losses(ddp_run, "val"), abs=1e-5)
    assert_same_weights(sharded_model_state(step_dir(fsdp, STEPS)), sharded_model_state(step_dir(ddp_run, STEPS)))
    assert_same_weights(load_file(fsdp / "model.safetensors"), load_file(ddp_run / "model.safetensors"))


@pytest.mark.slow
def test_fsdp_on_one_process_under_torchrun_equals_plain(corpus2, tmp_path, capfd):
    """torchrun with one process and train.parallel = fsdp really shards (over a group of one: what CPU
    offload on one GPU needs), writes DCP checkpoints, and trains exactly as the plain loop does."""
    forked(cli(overrides(tmp_path, corpus2, train__batch_size=2 * PER_RANK, train__parallel="fsdp")), nproc=1)
    assert "on 1 x cpu (fsdp)" in capfd.readouterr().out
    sharded = tmp_path / "run"
    assert all(is_sharded(p) for p in (sharded / "checkpoints").iterdir())
    one = train(tiny_config(tmp_path, corpus2, train__batch_size=2 * PER_RANK, log__run_dir=str(tmp_path / "one"),
                            **COMMON)).run_dir
    assert losses(sharded, "train") == pytest.approx(losses(one, "train"), abs=1e-5)
    final = load_checkpoint(one / "checkpoints" / f"step_{STEPS:08d}.pt")["model"]
    assert_same_weights(sharded_model_state(step_dir(sharded, STEPS)), final)


@pytest.mark.slow  # the module's ddp_run: a torchrun run
def test_ranks_compute_in_rank_zeros_precision(ddp_run, corpus2, tmp_path, monkeypatch):
    """`auto` on a CPU rests on a timing each process makes: were rank 1 to measure a bf16 gain rank 0 did
    not, it must still compute in fp32 like rank 0, so two ranks still equal one fp32 process."""
    from lmforge.train import precision

    monkeypatch.setattr(precision, "cpu_auto_precision", lambda: "bf16" if os.environ.get("RANK") == "1" else "fp32")
    forked(cli(overrides(tmp_path, corpus2, train__batch_size=PER_RANK, train__parallel="ddp", train__precision="auto")))
    assert losses(tmp_path / "run", "train") == pytest.approx(losses(ddp_run, "train"), abs=1e-5)


@pytest.mark.slow  # the module's ddp_run: a torchrun run
def test_two_rank_checkpoint_resumes_in_one_process(ddp_run, tmp_path, capsys):
    """Damage the DDP run's last checkpoint and go on in one process with the same global batch: it
    resumes from step 2's sharded checkpoint and the rest of the run is the uninterrupted one's."""
    run = tmp_path / "cut"
    shutil.copytree(ddp_run, run)
    (step_dir(run, STEPS) / "extras.pt").write_bytes(b"\0" * 64)
    assert main(["pretrain", "--resume", "auto", "--log.run_dir", str(run),
                 "--train.batch_size", str(2 * PER_RANK), "--train.parallel", "auto"]) == 0
    out = capsys.readouterr()
    assert "from step_00000002 (step 2)" in out.out
    assert f"set aside as {step_dir(run, STEPS).name}.damaged" in out.err
    # step 4 is now the one-process file; the damaged directory is kept aside, out of the run's way
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004.damaged",
                                                                       "step_00000004.pt"]
    assert [r["step"] for r in read_metrics(run, "train")] == list(range(1, STEPS + 1))
    assert losses(run, "train") == pytest.approx(losses(ddp_run, "train"), abs=1e-5)
    resumed = load_checkpoint(run / "checkpoints" / f"step_{STEPS:08d}.pt")["model"]
    assert_same_weights(resumed, sharded_model_state(step_dir(ddp_run, STEPS)))


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_ranks_with_fsdp(corpus2, tmp_path, capfd):
    one = train(tiny_config(tmp_path, corpus2, train__batch_size=2 * PER_RANK, **COMMON)).run_dir
    run = tmp_path / "cut"
    shutil.copytree(one, run)
    (run / "checkpoints" / f"step_{STEPS:08d}.pt").unlink()
    capfd.readouterr()
    forked(["pretrain", "--resume", "auto", "--log.run_dir", str(run), "--train.batch_size", str(PER_RANK),
            "--train.parallel", "fsdp"])
    assert capfd.readouterr().out.count("from step_00000002.pt (step 2)") == 1  # said by rank 0 alone
    assert losses(run, "train") == pytest.approx(losses(one, "train"), abs=1e-5)
    final = load_checkpoint(one / "checkpoints" / f"step_{STEPS:08d}.pt")["model"]
    assert_same_weights(sharded_model_state(step_dir(run, STEPS)), final)


def evaluate_report(checkpoint: Path, data: Path, out: Path) -> dict:
    """`lmforge evaluate` of `checkpoint` (a run: its best weights, or a checkpoint) on `data`: the full report."""
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    del report["data"]
    return report


@pytest.mark.slow
@pytest.mark.parametrize("parallel,peft", [("ddp", "none"), ("fsdp", "none"), ("fsdp", "lora")])
def test_final_report_is_made_on_the_best_weights_on_every_rank(tmp_path, monkeypatch, parallel, peft):
    """With several processes too, the end-of-run report (dev_report.json, confusion.png; a translation's beam
    BLEU) is made on the best weights, not the last: the first of two evaluations is scripted to be the best,
    and the report equals `lmforge evaluate` of model.safetensors, not of the last checkpoint. A LoRA run's
    weights and sharded checkpoints hold what trains only (the base is read back from init_from)."""
    from lmforge.tasks.classify import ClassifyTask

    base = make_base(tmp_path / "base", "mlm")
    train_file, dev = classify_files(tmp_path)
    real_evaluate, evals = ClassifyTask.evaluate, itertools.count(1)
    monkeypatch.setattr(ClassifyTask, "evaluate", lambda self, model, to_device: {
        **real_evaluate(self, model, to_device), "accuracy": 1 / next(evals)})  # every later evaluation is worse
    run = tmp_path / "run"
    # 160 examples in global batches of 2 x 8: 10 steps, evaluated at steps 5 and 10
    forked(["finetune", "--task", "classify", "--finetune.init_from", str(base), "--finetune.train", str(train_file),
            "--finetune.dev", str(dev), "--finetune.epochs", "1", "--finetune.evals_per_epoch", "2",
            "--finetune.classifier_dropout", "0", "--train.batch_size", "8", "--train.lr", "3e-3",
            "--train.warmup_steps", "1", "--train.device", "cpu", "--train.parallel", parallel,
            "--log.run_dir", str(run), "--log.progress", "false", "--log.trackers", "[]", "--peft.method", peft,
            "--train.checkpoint_every", "5"])
    assert [r["step"] for r in read_metrics(run, "val")] == [5, 10]
    if peft == "lora":
        kept = {*load_file(run / "model.safetensors"), *sharded_model_state(step_dir(run, 10))}
        assert kept and all(k.endswith(("lora_A", "lora_B")) or k.startswith(("classifier.", "pooler.")) for k in kept)
        # and such a sharded checkpoint resumes in one process (the same global batch) as the run went on
        cut = tmp_path / "cut"
        shutil.copytree(run, cut)
        shutil.rmtree(step_dir(cut, 10))
        assert main(["finetune", "--resume", str(step_dir(cut, 5)), "--train.batch_size", "16",
                     "--train.parallel", "auto"]) == 0
        assert losses(cut, "train") == pytest.approx(losses(run, "train"), abs=1e-5)

    report = json.loads((run / "dev_report.json").read_text())
    best = evaluate_report(run, dev, tmp_path / "best.json")
    last = evaluate_report(step_dir(run, 10), dev, tmp_path / "last.json")
    assert abs(best["loss"] - last["loss"]) > 1e-3  # the test can tell the two apart
    assert report.keys() == best.keys()
    for key, value in best.items():
        assert report[key] == (pytest.approx(value, abs=1e-5) if isinstance(value, float) else value), key
    assert (run / "confusion.png").is_file()


@pytest.mark.slow
def test_activation_checkpointing_recomputes_blocks_with_the_same_result(corpus, tmp_path, monkeypatch):
    import torch.utils.checkpoint as tuc

    plain = train(tiny_config(tmp_path / "plain", corpus, model__dropout=0.1, model__n_layer=2)).run_dir
    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: calls.append(torch.is_grad_enabled()) or real(*a, **k))
    ckpt = train(tiny_config(tmp_path / "ckpt", corpus, model__dropout=0.1, model__n_layer=2,
                             train__activation_checkpointing=True)).run_dir
    assert sum(calls) == 2 * 4  # both blocks at each of the 4 training steps (evaluation has nothing to save)
    assert losses(ckpt, "train") == pytest.approx(losses(plain, "train"), abs=1e-6)
    assert losses(ckpt, "val") == pytest.approx(losses(plain, "val"), abs=1e-6)


def test_parallel_options_are_checked(corpus, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="train.optimizer = muon needs whole weight matrices"):
        tiny_config(tmp_path, corpus, train__parallel="fsdp", train__optimizer="muon")
    with pytest.raises(ConfigError, match="fsdp_cpu_offload = true needs train.parallel = fsdp"):
        tiny_config(tmp_path, corpus, train__fsdp_cpu_offload=True)
    # ddp / fsdp without torchrun: one process trains alone, with a warning
    with pytest.warns(UserWarning, match="train.parallel = fsdp with one process"):
        d = distributed.setup(tiny_config(tmp_path, corpus, train__parallel="fsdp").train, torch.device("cpu"))
    assert (d.world, d.parallel, d.main) == (1, "none", True)
    # none under torchrun would have every process train its own model: refused before anything starts
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="train.parallel = none, but torchrun started 2 processes"):
        distributed.setup(tiny_config(tmp_path, corpus, train__parallel="none").train, torch.device("cpu"))


def test_ranks_take_disjoint_slices_of_one_global_batch():
    import numpy as np

    from lmforge.data.batches import RandomWindows

    tokens = np.arange(1000, dtype=np.uint16)
    whole = RandomWindows(tokens, 8, 6, seed=3)
    ranks = [RandomWindows(tokens, 8, 3, seed=3, shard=(r, 2)) for r in range(2)]
    for _ in range(3):
        want, parts = next(whole), [next(r) for r in ranks]
        for key in ("input", "target"):
            assert torch.equal(torch.cat([p[key] for p in parts]), want[key])
        assert not torch.equal(parts[0]["input"], parts[1]["input"])
    assert torch.equal(ranks[1].state_dict()["generator"], whole.state_dict()["generator"])  # one global position


@pytest.mark.slow  # a DDP forward imports torch._dynamo: ~2.5 s here unless an earlier test did
def test_gradients_are_reduced_once_per_accumulated_step(corpus, tmp_path):
    """distributed.no_sync skips DDP's all-reduce on every micro-batch but the last (a 1-process gloo group)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import GPT

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        runner = DDP(distributed.Runner(GPT(ModelConfig(vocab_size=20, n_layer=1, n_head=2, d_model=16, max_seq_len=8))))
        reductions = []

        def counting_hook(state, bucket):
            reductions.append(bucket.index())
            done = torch.futures.Future()
            done.set_result(bucket.buffer())
            return done

        runner.register_comm_hook(None, counting_hook)
        x = torch.randint(20, (2, 8))
        for accum in (1, 3):
            reductions.clear()
            for i in range(accum):
                with distributed.no_sync(runner, skip=i < accum - 1):
                    runner(lambda model, idx: model(idx).square().mean(), x).backward()
            assert len(reductions) == len(set(reductions)) > 0, (accum, reductions)  # each bucket once
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_masked_lm_with_nsp_on_two_ranks_equals_one_process(corpus2, tmp_path):
    """The mlm task's batches (masking and NSP draws included) and loss split across ranks exactly as
    the causal LM's do: FSDP on 2 ranks gives the losses of one process with the whole global batch."""
    mlm = dict(task="mlm", data__tokenizer__special_tokens="[CLS],[SEP],[MASK]", mlm__nsp=True,
               model__type_vocab_size=2, model__norm_position="post", model__pos="learned")
    forked(cli(overrides(tmp_path / "two", corpus2, train__batch_size=PER_RANK, train__parallel="fsdp", **mlm)))
    one = train(tiny_config(tmp_path / "one", corpus2, train__batch_size=2 * PER_RANK, **COMMON,
                            **{**mlm, "data__tokenizer__special_tokens": ["[CLS]", "[SEP]", "[MASK]"]})).run_dir
    two = tmp_path / "two" / "run"
    assert losses(two, "train") == pytest.approx(losses(one, "train"), abs=1e-5)
    assert [r["acc"] for r in read_metrics(two, "val")] == [r["acc"] for r in read_metrics(one, "val")]
    final = load_checkpoint(one / "checkpoints" / f"step_{STEPS:08d}.pt")["model"]
    assert_same_weights(sharded_model_state(step_dir(two, STEPS)), final)
