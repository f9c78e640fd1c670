"""Where harness commands run: scoped CPU threads and the per-model default."""

from __future__ import annotations

import torch

from flashu_fx.config import get_config
from harness.devices import auto_threads, intra_op_threads


def test_threads_are_scoped():
    before = torch.get_num_threads()
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert auto_threads(None, cpu, get_config("tiny")) == 1
    assert auto_threads(None, cpu, get_config("showo2-1.5b")) is None
    assert (
        auto_threads(None, cuda, get_config("tiny")) is None
        and auto_threads(3, cpu, get_config("tiny")) == 3
    )
