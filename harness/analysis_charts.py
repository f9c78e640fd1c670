"""The charts of ``python -m harness analyze`` (matplotlib, bare Figures: no pyplot global state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.llm_analysis import GenAnalysis, UndAnalysis


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def save_layer_similarity(gen: GenAnalysis | None, und: UndAnalysis | None, path: Path) -> Path:
    """Heatmaps of cos(input, output) per layer: generation over denoising calls, understanding over token steps
    (paper Fig. 2 and 4); below each, the mean per layer."""
    from matplotlib.ticker import MaxNLocator

    panels = [(name, m, axis) for name, m, axis in (
        ("generation: image slot, per denoising call", None if gen is None else gen.cosine, "denoising call"),
        ("understanding: step 0 = prefill (last position), then decode tokens", None if und is None else und.cosine,
         "token step")) if m is not None]
    fig = _figure(6.0 * len(panels), 6.5)
    grid = fig.add_gridspec(2, len(panels), height_ratios=[3, 1])
    for col, (title, matrix, axis) in enumerate(panels):
        ax = fig.add_subplot(grid[0, col])
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", origin="upper", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("LLM layer")
        ax.set_ylabel(axis)
        for which in (ax.xaxis, ax.yaxis):
            which.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(image, ax=ax, label="cos(layer input, output)")
        mean = fig.add_subplot(grid[1, col])
        mean.plot(np.arange(matrix.shape[1]), matrix.mean(0), marker="o")
        mean.xaxis.set_major_locator(MaxNLocator(integer=True))
        mean.set_xlabel("LLM layer")
        mean.set_ylabel("mean cosine")
        mean.grid(alpha=0.3)
    fig.suptitle("Layer input/output similarity (high: a layer that barely changes its input, a skip candidate)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return path


def save_vnorm_attention(und: UndAnalysis, path: Path) -> Path:
    """Scatter of each image token's ||V|| against the attention it receives at ``und.vnorm_layer``, and the
    correlation at every layer (paper Fig. 5)."""
    fig = _figure(11.0, 4.2)
    ax = fig.add_subplot(1, 2, 1)
    ax.scatter(und.vnorm, und.attention, s=6, alpha=0.5)
    layer = und.vnorm_layer
    ax.set_title(f"layer {layer}: Pearson {und.pearson[layer]:+.2f}, Spearman {und.spearman[layer]:+.2f}",
                 fontsize=9)
    ax.set_xlabel("||V|| of an image token (all KV heads)")
    ax.set_ylabel("attention received from the text after the image")
    ax.grid(alpha=0.3)
    right = fig.add_subplot(1, 2, 2)
    layers = np.arange(len(und.pearson))
    right.plot(layers, und.pearson, marker="o", label="Pearson")
    right.plot(layers, und.spearman, marker="s", label="Spearman")
    right.axhline(0.0, color="grey", lw=0.8)
    right.set_xlabel("LLM layer")
    right.set_ylabel("correlation of ||V|| and attention")
    right.legend(frameon=False)
    right.grid(alpha=0.3)
    fig.suptitle("V-norm of image tokens vs the attention they receive (understanding prefill)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return path


def save_image_attention(gen: GenAnalysis | None, und: UndAnalysis | None, path: Path) -> Path:
    """Per layer, the share of attention on image tokens: generation's image queries (mean over calls),
    understanding's text queries after the image (mean over questions)."""
    fig = _figure(7.5, 4.0)
    ax = fig.add_subplot()
    if gen is not None:
        ax.plot(gen.image_share.mean(0), marker="o", label="generation: image tokens -> image slot")
    if und is not None:
        ax.plot(und.image_share.mean(0), marker="s", label="understanding: text after the image -> image tokens")
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("LLM layer")
    ax.set_ylabel("share of attention on image tokens")
    ax.set_title("Attention on image tokens per layer", fontsize=10)
    ax.legend(frameon=False, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return path
