"""train.precision and train.tf32: what `auto` picks on each device, the refusals, and fp16's loss
scaling in the loop (trained and resumed exactly, its scale in the checkpoint).

No GPU is needed: CUDA's answers are stood in for where a test only asks what would be chosen, and
the fp16 loop runs on the CPU (CPU autocast has fp16; only the configuration refuses it there).
The same loop on CUDA is in tests/test_gpu.py."""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch

from helpers import read_metrics, shakespeare_text, tiny_config, write_corpus
from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.train import loop, perf, precision
from lmforge.train.checkpoint import load_checkpoint
from lmforge.train.precision import Precision, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def fake_gpu(monkeypatch, bf16: bool, name: str = "Tesla T4") -> None:
    monkeypatch.setattr(precision, "cuda_has_bf16", lambda device: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available")
def test_auto_on_cuda_is_bf16_where_native_else_fp16_with_scaling(monkeypatch):
    fake_gpu(monkeypatch, bf16=True, name="NVIDIA H100")
    chosen = resolve_precision("auto", CUDA)
    assert (chosen.name, chosen.dtype) == ("bf16", torch.bfloat16)
    assert chosen.grad_scaler() is None
    fake_gpu(monkeypatch, bf16=False)
    chosen = resolve_precision("auto", CUDA)
    assert (chosen.name, chosen.dtype) == ("fp16", torch.float16)
    assert isinstance(chosen.grad_scaler(), torch.amp.GradScaler)


@pytest.mark.parametrize("name, device, parallel, expected", [
    ("bf16", CUDA, "none", ["train.precision = bf16", "Tesla T4 has no native bf16", "fp16 or fp32"]),
    ("fp16", CPU, "none", ["train.precision = fp16 on cpu", "CUDA only", "auto, bf16 or fp32"]),
    ("fp16", CUDA, "fsdp", ["train.precision = fp16 with train.parallel = fsdp", "bf16"]),
    ("fp8", CPU, "none", ["train.precision = 'fp8'", "auto, fp32, bf16, fp16"]),
])
def test_refusals_name_the_key_the_value_and_what_is_accepted(monkeypatch, name, device, parallel, expected):
    fake_gpu(monkeypatch, bf16=False)
    with pytest.raises(UserError) as e:
        resolve_precision(name, device, parallel)
    assert "\n" not in str(e.value)
    for text in expected:
        assert text in str(e.value)


def test_cpu_auto_needs_the_flags_and_a_measured_gain(monkeypatch, tmp_path):
    """No bf16 flags: fp32 without timing anything. With them: bf16 only when the timed gain reaches
    BF16_MIN_GAIN, measured once per CPU model and then read from the cache."""
    monkeypatch.setattr(perf, "CACHE", tmp_path / "perf.json")
    timings = []

    def gain(value):
        return lambda: timings.append(value) or value

    monkeypatch.setattr(perf, "_cpu_flags", lambda: {"avx2"})
    monkeypatch.setattr(perf, "measure_bf16_step_gain", gain(9.0))
    assert resolve_precision("auto", CPU).name == "fp32" and timings == []

    monkeypatch.setattr(perf, "_cpu_flags", lambda: {"avx512_bf16", "amx_bf16"})
    monkeypatch.setattr(perf, "_cpu_name", lambda: "Xeon A")
    assert perf.cpu_auto_precision() == "bf16" and resolve_precision("auto", CPU).name == "bf16"
    assert timings == [9.0]  # measured once, then cached
    monkeypatch.setattr(perf, "_cpu_name", lambda: "Xeon B")
    monkeypatch.setattr(perf, "measure_bf16_step_gain", gain(perf.BF16_MIN_GAIN - 0.05))
    assert perf.cpu_auto_precision() == "fp32"


REAL_MEASURE = perf.measure_bf16_step_gain  # taken before the session fixture fixes it at 1.0


def test_measured_gain_is_fp32_time_over_bf16_time(monkeypatch):
    """Runs the real sublayer in both precisions, on a clock where every fp32 pass takes 2 s and every
    bf16 pass 1 s: the gain is their ratio, the warm-up round left out."""
    clock = itertools.accumulate(itertools.cycle([0.0, 2.0, 0.0, 1.0]))  # start, end of fp32; start, end of bf16
    monkeypatch.setattr(perf.time, "perf_counter", lambda: next(clock))
    assert REAL_MEASURE(width=64, rows=64, repeats=3) == pytest.approx(2.0)


def test_tf32_switch_touches_cuda_only():
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9: the legacy allow_tf32 switch")
    before = matmul.fp32_precision
    try:
        precision.set_tf32(CUDA, False)
        assert matmul.fp32_precision == "ieee"
        precision.set_tf32(CUDA, True)
        assert matmul.fp32_precision == "tf32"
        precision.set_tf32(CPU, False)  # a CPU run leaves CUDA's setting alone
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before


@pytest.mark.slow
def test_fp16_with_loss_scaling_trains_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    """The loop's fp16 path (autocast + GradScaler: scale, unscale before clipping, a step skipped on
    overflow, update) on the CPU: the scale is saved with each checkpoint, and a run resumed from the
    middle equals the uninterrupted one, loss for loss and weight for weight."""
    real = loop.resolve_precision
    monkeypatch.setattr(loop, "resolve_precision",
                        lambda name, device, parallel="none": Precision("fp16", device) if name == "fp16"
                        else real(name, device, parallel))
    n = 4
    corpus = write_corpus(tmp_path, shakespeare_text(30_000))
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    train_cfg = tiny_config(tmp_path, corpus, train__precision="fp16", train__max_steps=2 * n, train__checkpoint_every=n,
                            train__keep_checkpoints=10, train__warmup_steps=1, train__lr=3e-3, eval__every=n,
                            log__run_dir=str(run_a))
    loop.train(train_cfg)
    state = load_checkpoint(run_a / "checkpoints" / f"step_{n:08d}.pt")
    assert state["scaler"]["scale"] > 1.0  # fp16's loss scale travels with the checkpoint
    losses = [r["loss"] for r in read_metrics(run_a, "train")]
    assert losses[-1] < losses[0]

    shutil.copytree(run_a, run_b)
    for p in (run_b / "checkpoints").glob("step_*.pt"):
        if int(p.stem.split("_")[1]) > n:
            p.unlink()
    assert main(["pretrain", "--resume", "auto", "--log.run_dir", str(run_b)]) == 0
    assert "in fp16" in capsys.readouterr().out
    assert [r["loss"] for r in read_metrics(run_b, "train")] == pytest.approx(losses, abs=1e-6)
    final = f"step_{2 * n:08d}.pt"
    wa, wb = (load_checkpoint(run / "checkpoints" / final) for run in (run_a, run_b))
    assert wa["scaler"] == wb["scaler"]
    for k in wa["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k
