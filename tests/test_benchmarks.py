"""The benchmarks' own logic, on tiny models (their --smoke modes): each runs end to end and prints its RESULT line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def benchmark_env() -> dict[str, str]:
    """A benchmark subprocess's environment: lmforge's source first, and bytecode cached under .cache/ as
    `make test-fast` does (peft, transformers and torchao otherwise recompile at each start)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "PYTHONPYCACHEPREFIX": str(ROOT / ".cache" / "pycache")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


@pytest.mark.slow  # a subprocess importing torch, transformers and peft, and two short training runs
def test_sft_vs_hf_smoke_runs_both_sides_and_scores_them_with_one_function(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    if not (DATA / "sst2" / "train.txt").is_file():
        pytest.skip(f"the shared data sets are not at {DATA} (the chat set of scripts/chat_data.py is built from them)")
    env = benchmark_env()
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sft_vs_hf.py"), "--smoke"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert re.fullmatch(r"RESULT tok_s_ratio=\d+\.\d\d mem_ratio=\d+\.\d\d loss=\d+\.\d{4} hf_loss=\d+\.\d{4}", lines[-1]), lines[-1]
    for side in ("lmforge", "transformers"):  # each side trained its 2 steps and counted real tokens
        row = next(line for line in lines if re.match(rf"{side} +[\d.]+ tok/s", line))
        assert re.search(r"tok/s \([\d,]+ real tokens in [\d.]+ s of 2 steps", row), row
    # lmforge's own dev loss and the shared evaluation of its exported model agree
    check = next(line for line in lines if line.startswith("lmforge's own dev loss"))
    own, shared = map(float, re.search(r"conversations (\d+\.\d+), the shared evaluation of its export (\d+\.\d+)",
                                       check).groups())
    assert abs(own - shared) < 1e-3, check


@pytest.mark.slow  # three subprocesses importing torch and torchao, each a short training run
def test_qlora_memory_smoke_runs_each_variant_in_its_own_process_and_compares_them(tmp_path):
    pytest.importorskip("torchao")
    if not (DATA / "sst2" / "train.txt").is_file():
        pytest.skip(f"the shared data sets are not at {DATA} (the chat set of scripts/chat_data.py is built from them)")
    env = benchmark_env()
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "qlora_memory.py"), "--smoke"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert re.fullmatch(r"RESULT mem_ratio_int8=\d+\.\d\d loss_ratio_int8=\d+\.\d{4} tok_s_ratio_int8=\d+\.\d\d "
                        r"mem_ratio_nf4=\d+\.\d\d loss_ratio_nf4=\d+\.\d{4} tok_s_ratio_nf4=\d+\.\d\d", lines[-1]), lines[-1]
    losses = {}
    for variant in ("fp32", "int8", "nf4"):  # each trained its 2 steps, measured its memory and its dev loss
        row = next(line for line in lines if line.startswith(f"{variant} ") and " peak " in line)
        assert re.search(r"tok/s \([\d,]+ real tokens in [\d.]+ s of 2 steps\)", row), row
        losses[variant] = float(re.search(r"dev loss (\d+\.\d+)", row).group(1))
    # a random tiny model's loss is ln(vocab) or so on every base: the quantised bases change it little
    assert abs(losses["int8"] / losses["fp32"] - 1) < 0.01 and abs(losses["nf4"] / losses["fp32"] - 1) < 0.05, losses


@pytest.mark.slow  # a subprocess importing torch and onnxruntime, a short training run and an ONNX export
def test_onnx_latency_smoke_scores_and_times_lmforge_and_both_onnx_graphs(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    if not (DATA / "sst2" / "train.txt").is_file():
        pytest.skip(f"the shared SST-2 data set is not at {DATA}")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "onnx_latency.py"), "--smoke"], cwd=tmp_path,
                          env=benchmark_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert re.fullmatch(r"RESULT ort_speedup_b1=\d+\.\d\d ort_speedup_b32=\d+\.\d\d int8_speedup_b1=\d+\.\d\d "
                        r"int8_speedup_b32=\d+\.\d\d int8_over_fp32_b1=\d+\.\d\d int8_over_fp32_b32=\d+\.\d\d "
                        r"int8_acc_drop=-?\d+\.\d\d acc_fp32=\d\.\d{4} acc_int8=\d\.\d{4}",
                        lines[-1]), lines[-1]
    # the fp32 graph computes lmforge's logits, so it scores the same sentences right
    diff = float(re.search(r"max abs logit difference (\S+)", done.stdout).group(1))
    accs = {side: float(re.search(rf"{side} +accuracy (\d\.\d{{4}})", done.stdout).group(1))
            for side in ("lmforge eager", "onnxruntime fp32", "onnxruntime int8")}
    assert diff < 1e-4 and accs["lmforge eager"] == accs["onnxruntime fp32"], (diff, accs)
