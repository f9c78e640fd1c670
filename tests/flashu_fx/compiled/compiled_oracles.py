"""What the compiled-path tests share: the comparison against their eager twins, a FlashU-ready model copy."""

from __future__ import annotations

import copy

import torch

from flashu_fx.ffn_layout import FFNLayout, build_ffn_layout, permute_ffn_weights, top_k_mask


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the whole tensor."""
    return float((a - b).norm() / b.norm())


def permuted_with_layout(model, config, seed: int) -> tuple[torch.nn.Module, FFNLayout]:
    """A copy of ``model`` with its FFN permuted for random "gen" and "und" neuron scores (so each task's range start
    varies by layer), keeping ``config.kept_ffn_width`` neurons per task, and the layout."""
    work = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    layers, inter = work.config.num_layers, work.config.intermediate_size
    keep = {t: top_k_mask(torch.rand(layers, inter, generator=gen), config.kept_ffn_width(inter))
            for t in ("gen", "und")}
    layout = build_ffn_layout(keep)
    permute_ffn_weights(work, layout.order)
    return work, layout
