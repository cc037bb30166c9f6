"""Pytest machinery only: the session set-up, the per-test chdir, shared fixtures and the gpu skip hook.

Plain helpers (corpora, configs, tiny runs, a server process) live in helpers.py, which test modules
import directly; pytest puts this folder on sys.path for this conftest, so `import helpers` resolves
under `python -m pytest` from the repository root as on CI.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import GPU_TEST_DEVICE, synthetic_text, write_corpus, write_fixed_perf_cache


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A 20k-character synthetic corpus in tmp_path."""
    return write_corpus(tmp_path, synthetic_text())


@pytest.fixture(scope="session", autouse=True)
def _session_setup(tmp_path_factory):
    """One intra-op thread: the models here are tiny, and on a CPU shared with other work two threads
    waiting on each other are ten times slower than one. train() reports MFU against a CPU peak it
    measures once and caches under ~/.cache, and `auto` precision on a CPU times bf16 once: in tests
    (and the commands they start, through LMFORGE_CACHE) fixed figures in a cache under the session's
    temp folder, so nothing is measured or written to the home folder."""
    import torch

    import lmforge.train.perf as perf

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cache = write_fixed_perf_cache(tmp_path_factory.mktemp("perf"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_CACHE", str(cache))
        mp.setattr(perf, "CACHE", cache / "peak_flops.json")
        mp.setattr(perf, "measure_matmul_flops", lambda *a, **k: 1e11)
        mp.setattr(perf, "measure_bf16_step_gain", lambda *a, **k: 1.0)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """Run every test from its tmp_path, so a relative default (runs/, .cache/) can never land in the repo."""
    monkeypatch.chdir(tmp_path)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped, with the reason, on a machine without it."""
    if torch.cuda.is_available() or GPU_TEST_DEVICE != "cuda":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (make test-gpu on a machine with one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
