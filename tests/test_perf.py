"""The device-facts cache (train/perf.py) and the MFU the loop reports from it.

A CPU's peak FLOP/s is measured and cached per CPU model, thread count and torch version; each entry is
dated and taken again once it is a day old. A utilisation above 1 means the peak is wrong: the meter
measures it once more and never reports more than 1. The measuring function is replaced by one that
counts its calls, on a private cache file."""

from __future__ import annotations

import json
import time

import pytest
import torch

from lmforge.train import perf
from lmforge.train.loop import Throughput

CPU = torch.device("cpu")
DAY = 24 * 3600


@pytest.fixture
def measured(monkeypatch, tmp_path) -> list[int]:
    """A private cache and a matmul measurement of 2e11 FLOP/s that records each call (its thread count)."""
    monkeypatch.setattr(perf, "CACHE", tmp_path / "peak_flops.json")
    calls = []
    monkeypatch.setattr(perf, "measure_matmul_flops", lambda *a, **k: calls.append(torch.get_num_threads()) or 2e11)
    return calls


def write_cache(entries: dict) -> None:
    perf.CACHE.write_text(json.dumps(entries))


def fp32_key(threads: int | None = None) -> str:
    return perf.cache_key(str(torch.float32), threads)


def test_a_fresh_measurement_is_read_from_the_cache(measured):
    write_cache({fp32_key(): perf.cache_entry(5e10, time.time() - DAY / 2)})
    assert perf.peak_flops(CPU, torch.float32) == 5e10
    assert measured == []


@pytest.mark.parametrize("entry", [perf.cache_entry(5e10, time.time() - 2 * DAY), 5e10],
                         ids=["a-day-old", "undated"])
def test_an_old_or_undated_measurement_is_taken_again(measured, entry):
    write_cache({fp32_key(): entry})
    assert perf.peak_flops(CPU, torch.float32) == 2e11
    assert len(measured) == 1
    saved = json.loads(perf.CACHE.read_text())[fp32_key()]
    assert saved["value"] == 2e11 and time.time() - saved["measured"] < 60
    assert perf.peak_flops(CPU, torch.float32) == 2e11 and len(measured) == 1  # then cached


def test_another_thread_count_is_measured_with_its_threads(measured):
    threads = torch.get_num_threads()
    other = threads + 1
    write_cache({fp32_key(threads): perf.cache_entry(5e10)})
    try:
        torch.set_num_threads(other)
        assert perf.peak_flops(CPU, torch.float32) == 2e11
    finally:
        torch.set_num_threads(threads)
    assert measured == [other]
    table = json.loads(perf.CACHE.read_text())
    assert table[fp32_key(threads)]["value"] == 5e10 and table[fp32_key(other)]["value"] == 2e11


def test_fresh_measures_again_whatever_the_cache_holds(measured):
    write_cache({fp32_key(): perf.cache_entry(5e10)})
    assert perf.peak_flops(CPU, torch.float32, fresh=True) == 2e11 and len(measured) == 1


def mfus(meter: Throughput, windows: int) -> list[float]:
    meter.start()
    out = []
    for _ in range(windows):
        meter.count(1000)
        out.append(meter.window(1000)["mfu"])
    return out


def test_a_peak_below_the_rate_seen_is_measured_again_once_and_mfu_stays_at_most_1():
    """1e9 FLOPs per token at thousands of tokens per second against a peak of 1 FLOP/s: an impossible
    utilisation. The meter measures the peak again, once, and reports at most 1 in every window."""
    remeasured = []
    meter = Throughput(1e9, 1.0, 1, remeasure=lambda: remeasured.append(1) or 2.0)
    assert all(0 < mfu <= 1 for mfu in mfus(meter, 3))
    assert remeasured == [1]
    without = Throughput(1e9, 1.0, 2)  # a GPU's data-sheet peak: nothing to measure, the peak is raised
    assert all(0 < mfu <= 1 for mfu in mfus(without, 2))
