"""The clock and power a GPU held while a benchmark row ran.

A floor counts FLOPs at a peak rate measured in a short burst at the full clock. A long enough run of dense products
holds an H100 at its power limit (700 W), where the clock falls to about 80% of full, and every FLOP takes longer
(BENCHMARKS.md, "the power limit"). ``ClockSampler`` records the SM clock and the board power in a thread while a
row's timed runs go on, so each row reports what the card held beside its time.

    reader = nvml_reader(torch.device("cuda"))       # None: no NVML (no GPU, or nvidia-ml-py not installed)
    with ClockSampler(reader) as sampler:
        run()
    sampler.summary()   # {"samples": 41, "median_mhz": 1635.0, "min_mhz": 1530.0, "max_mhz": 1980, ...}
"""

from __future__ import annotations

import statistics
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

INTERVAL_S = 0.02  # NVML updates the clock about every 10-20 ms; power is a moving average over longer


@dataclass(frozen=True)
class ClockReader:
    """``read()`` -> (SM clock MHz, board power W) now; ``max_mhz``: the SM clock the card may run at (None: not
    known)."""

    read: Callable[[], tuple[float, float]]
    max_mhz: float | None


def nvml_reader(device: torch.device) -> ClockReader | None:
    """A reader of ``device``'s SM clock and power (``torch.cuda.clock_rate`` and ``power_draw``, which read NVML
    through ``nvidia-ml-py``); None off CUDA or where NVML cannot be read."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    def read() -> tuple[float, float]:
        return float(torch.cuda.clock_rate(device)), torch.cuda.power_draw(device) / 1000.0  # mW -> W

    try:
        read()
    except Exception:  # noqa: BLE001 - no nvidia-ml-py, no driver, no permission: no clock to report
        return None
    return ClockReader(read, _max_sm_clock(device))


def _max_sm_clock(device: torch.device) -> float | None:
    """The card's full SM clock in MHz from NVML (torch exposes the current clock only), or None."""
    try:
        import pynvml

        # torch's own CUDA -> NVML index (CUDA_VISIBLE_DEVICES may renumber the cards)
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda._get_nvml_device_index(device))
        return float(pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM))
    except Exception:  # noqa: BLE001 - the share of the full clock is then not reported
        return None


@dataclass
class ClockSampler:
    """Samples ``reader`` every ``interval_s`` in a thread inside ``with``; ``summary()`` after. With no reader it
    records nothing and ``summary()`` is None."""

    reader: ClockReader | None
    interval_s: float = INTERVAL_S
    samples: list[tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def __enter__(self) -> ClockSampler:
        if self.reader is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            try:
                self.samples.append(self.reader.read())
            except Exception:  # noqa: BLE001 - a reading that fails ends the sampling, never the benchmark
                return
            if self._stop.wait(self.interval_s):
                return

    def summary(self) -> dict | None:
        """Median, lowest and highest SM clock (MHz) and median power (W) over the samples, the card's full clock
        and the median's share of it; None without a reader or samples."""
        if self.reader is None or not self.samples:
            return None
        clocks = [c for c, _ in self.samples]
        median, full = statistics.median(clocks), self.reader.max_mhz
        return {"samples": len(self.samples), "median_mhz": median, "min_mhz": min(clocks), "max_mhz": max(clocks),
                "full_mhz": full, "share_of_full": median / full if full else None,
                "median_w": statistics.median(w for _, w in self.samples)}
