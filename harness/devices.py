"""Where a harness command runs: the device, its dtype names, CPU threads, and the name a report gives it."""

from __future__ import annotations

import contextlib
import platform

import torch

from flashu_fx.config import Showo2Config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


@contextlib.contextmanager
def intra_op_threads(n: int | None):
    """torch's intra-op CPU threads set to ``n`` inside the block and restored after; None changes nothing."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def auto_threads(threads: int | None, device: torch.device, cfg: Showo2Config) -> int | None:
    """``--threads`` if given; else 1 for a tiny model on the CPU, where each op is microseconds of work and
    OpenMP synchronisation costs more than it saves (a 96x64 @ 64x256 linear on a loaded 2-core machine: 33 us
    on 1 thread, 0.5-2.7 ms on 2; the tiny demo went from 50 s to 8 s); else torch's default (None)."""
    if threads is not None:
        return threads
    return 1 if device.type == "cpu" and cfg.hidden_size <= 256 else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
