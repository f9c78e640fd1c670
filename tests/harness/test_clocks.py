"""harness.clocks: the SM clock and power a row held, sampled while it ran, and the bench's share of the floor at
that clock."""

from __future__ import annotations

import argparse
import itertools
import time

import pytest
import torch

from harness import bench, rows
from harness.clocks import ClockReader, ClockSampler, nvml_reader
from harness.random_model import ChunkTokenizer


def fake_reader(clocks: list[float], watts: list[float], full: float = 1980.0) -> ClockReader:
    values = itertools.cycle(zip(clocks, watts, strict=True))
    return ClockReader(lambda: next(values), full)


def test_the_sampler_reads_while_inside_and_stops_after() -> None:
    sampler = ClockSampler(fake_reader([1980.0, 1500.0, 1600.0], [300.0, 700.0, 690.0]), interval_s=0.001)
    with sampler:
        time.sleep(0.05)
    count = len(sampler.samples)
    time.sleep(0.02)
    assert count >= 3 and len(sampler.samples) == count  # the thread has stopped
    summary = sampler.summary()
    assert summary["samples"] == count and summary["full_mhz"] == 1980.0
    assert summary["min_mhz"] == 1500.0 and summary["max_mhz"] == 1980.0
    assert summary["median_mhz"] in (1500.0, 1600.0, 1980.0)
    assert summary["share_of_full"] == pytest.approx(summary["median_mhz"] / 1980.0)


def test_a_steady_clock_summarises_to_itself() -> None:
    with ClockSampler(fake_reader([1630.0], [690.0]), interval_s=0.001) as sampler:
        time.sleep(0.01)
    summary = sampler.summary()
    assert summary["median_mhz"] == 1630.0 and summary["median_w"] == 690.0
    assert summary["share_of_full"] == pytest.approx(1630 / 1980)


def test_a_failing_reading_ends_the_sampling_not_the_run() -> None:
    calls = []

    def read() -> tuple[float, float]:
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("NVML went away")
        return 1700.0, 650.0

    with ClockSampler(ClockReader(read, None), interval_s=0.001) as sampler:
        time.sleep(0.02)
    summary = sampler.summary()
    assert summary["samples"] == 2 and summary["share_of_full"] is None  # no full clock known: no share


def test_no_reader_records_nothing() -> None:
    with ClockSampler(None) as sampler:
        pass
    assert sampler.summary() is None and sampler.samples == []
    assert nvml_reader(torch.device("cpu")) is None


def test_a_row_timed_on_the_cpu_has_no_clocks(tiny_model) -> None:
    ctx = rows.GenContext(tiny_model, [[5, 6, 7]], steps=4)
    result = rows.time_row("gen", "eager", rows.select_rows("gen", ["eager"])["eager"], ctx, warmup=0, repeats=1)
    assert result.clocks is None


def test_the_bench_reports_the_clock_and_the_floor_at_it(tiny_model) -> None:
    """Generation's floor is FLOPs at the full clock's peak: at 82% of the clock the share of the floor is the
    share at the full clock over 0.82. Understanding's decode floor is bytes: no share at the clock."""
    cfg = tiny_model.config
    tok = ChunkTokenizer(cfg)
    held = {"samples": 40, "median_mhz": 1623.6, "min_mhz": 1530.0, "max_mhz": 1770.0, "full_mhz": 1980.0,
            "share_of_full": 0.82, "median_w": 690.0}
    records = [{"name": "eager", "seconds": 1.0, "count": 49, "clocks": None},
               {"name": "compiled-flashu", "seconds": 0.5, "count": 34, "clocks": held}]
    ctx = rows.GenContext(tiny_model, [tok.encode("a cube")], steps=50)
    bench.add_floors(argparse.Namespace(task="gen", steps=50, guidance=10.0), cfg, ctx, "NVIDIA H100 80GB HBM3",
                     records)
    assert records[0]["pct_of_floor_at_clock"] is None
    assert records[1]["pct_of_floor_at_clock"] == pytest.approx(records[1]["pct_of_floor"] / 0.82)
    for rec in records:
        rec.update(speedup=1.0, peak_mem_gb=None, check={}, note="", ms_per_unit=1.0, unit="calls")
    table = bench.report_table(records).splitlines()
    assert "at clock" in table[0] and "SM clock, power" in table[0]
    assert "1624 MHz (82%), 690 W" in table[3] and f"{records[1]['pct_of_floor_at_clock']:.0f}%" in table[3]

    und_ctx = rows.UndContext(tiny_model, torch.zeros(1, 16, 8, 8), [5, 6], tok)
    und = [{"name": "compiled-flashu", "seconds": 0.2, "count": 8, "clocks": held}]
    bench.add_floors(argparse.Namespace(task="und", steps=50, guidance=10.0), cfg, und_ctx, "NVIDIA H100 80GB HBM3",
                     und)
    assert und[0]["pct_of_floor"] is not None and und[0]["pct_of_floor_at_clock"] is None


def test_a_clock_without_the_full_clock_has_no_share() -> None:
    clock = {"samples": 3, "median_mhz": 1700.0, "min_mhz": 1650.0, "max_mhz": 1750.0, "full_mhz": None,
             "share_of_full": None, "median_w": 650.0}
    rec = {"name": "compiled-flashu", "seconds": 0.5, "count": 34, "clocks": clock, "speedup": 1.0,
           "peak_mem_gb": None, "check": {}, "note": "", "ms_per_unit": 1.0, "unit": "calls", "pct_of_floor": 50.0,
           "pct_of_floor_at_clock": None}
    table = bench.report_table([rec]).splitlines()
    assert "at clock" not in table[0] and "1700 MHz, 650 W" in table[2]
