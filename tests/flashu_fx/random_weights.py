"""Random weights for the layer tests: drawn in parameter order, one normal tensor per parameter."""

from __future__ import annotations

import torch


def randomize_(module: torch.nn.Module, seed: int, std: float | None = None) -> torch.nn.Module:
    """Norm scales near 1 and norm shifts near 0 (so a skipped or mis-ordered norm is visible); every other
    tensor N(0, std^2), with ``std=None`` meaning 1/sqrt(fan_in) (unit-variance activations)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5 if std is None else std * noise)
    return module
