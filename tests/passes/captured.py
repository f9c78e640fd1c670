"""Dynamo-captured graphs for the pass tests: the FX graph a backend receives, and its example inputs."""

from __future__ import annotations

import torch
from torch import fx


def capture(fn, *args) -> tuple[fx.GraphModule, list]:
    """Capture ``fn(*args)`` whole (modules in ``args`` have their parameters lifted to placeholders)."""
    seen = {}

    def backend(gm, example_inputs):
        seen["gm"], seen["inputs"] = gm, example_inputs
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return seen["gm"], seen["inputs"]
