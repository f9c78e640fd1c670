"""The comparison the compiled-path tests use against their eager twins."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the whole tensor."""
    return float((a - b).norm() / b.norm())
