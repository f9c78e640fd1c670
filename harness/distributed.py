"""Data parallelism over requests for the harness commands: one process per device, started by ``torchrun``.

    torchrun --nproc-per-node N -m harness generate --prompts prompts.txt

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address in each process's environment; without
them a command runs as one process (world size 1, no process group). Processes talk over gloo on the CPU and
NCCL on CUDA (rank r on cuda:LOCAL_RANK); rank 0 gathers what the others made.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among ``world_size`` processes (torchrun's environment)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> Ranks:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """Where this rank runs: ``cuda:LOCAL_RANK`` for a CUDA device under torchrun, else ``device``."""
        if device.type == "cuda" and self.distributed:
            return torch.device("cuda", self.local_rank)
        return device

    def share(self, items: Sequence[T]) -> list[T]:
        """Items rank, rank + N, rank + 2N, ... of ``items`` (N = world size): this rank's share."""
        return list(items[self.rank :: self.world_size])

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank 0 (None on the others); the objects must pickle."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def once(self, make: Callable[[], T]) -> T:
        """``make()`` run on rank 0 only, its result handed to every rank (e.g. a calibration, which must be the
        same everywhere)."""
        if not self.distributed:
            return make()
        box = [make() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[Ranks]:
    """The process group of ``ranks`` for the ``with`` block (none for a single process): NCCL when ``device``
    is CUDA (this rank's GPU made current first), else gloo. Destroyed on the way out, on errors too."""
    if not ranks.distributed:
        yield ranks
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield ranks
    finally:
        dist.destroy_process_group()
