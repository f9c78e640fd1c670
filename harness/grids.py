"""Picture grids a person judges at a glance: rows = methods, columns = prompts, the caption under each image.

Needs matplotlib (the ``[plots]`` extra); images are drawn pixel-exact (nearest neighbour), enlarged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def captioned_grid(rows: Sequence[tuple[str, Sequence[np.ndarray]]], captions: Sequence[str], path: str | Path,
                   title: str = "", notes: Sequence[Sequence[str]] | None = None) -> Path:
    """Write a PNG grid. rows: (label, images uint8 (S, S, 3) one per caption); ``notes[r][c]``, if given, is a
    short line (or lines, split at newlines) under image (r, c) (e.g. "ok" / "wrong" from the scorer)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not rows or not captions:
        raise ValueError("captioned_grid needs at least one row and one caption")
    for label, images in rows:
        if len(images) != len(captions):
            raise ValueError(f"row {label!r} has {len(images)} images for {len(captions)} captions")
    n_rows, n_cols = len(rows), len(captions)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.9 * n_cols + 1.2, 2.25 * n_rows + 0.6), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c, image in enumerate(images):
            ax = axes[r][c]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            lines = [captions[c]] if notes is None else [*notes[r][c].split("\n"), captions[c]]
            ax.set_xlabel("\n".join(_wrap(line, 26) for line in lines if line), fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=9, rotation=90)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long captions wrap below the figure: keep them in
    plt.close(fig)
    return path


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join([*lines, line])


def prompt_grid(images: Sequence[np.ndarray], prompts: Sequence[str], path: str | Path, label: str, title: str = "",
                columns: int = 8, verdicts: Sequence[str] | None = None) -> Path:
    """One picture per prompt, each under its prompt (and its ``verdicts`` line, e.g. the scorer's, above it),
    ``columns`` to a row (the last row padded with black)."""
    if len(images) != len(prompts) or not prompts:
        raise ValueError(f"prompt_grid needs one image per prompt, got {len(images)} images, {len(prompts)} prompts")
    if verdicts is not None and len(verdicts) != len(prompts):
        raise ValueError(f"prompt_grid needs one verdict per prompt, got {len(verdicts)} for {len(prompts)} prompts")
    if len(prompts) <= columns:
        notes = None if verdicts is None else [list(verdicts)]
        return captioned_grid([(label, list(images))], list(prompts), path, title, notes)
    lines = list(prompts) if verdicts is None else [f"{v}\n{p}" for v, p in zip(verdicts, prompts, strict=True)]
    rows, notes = [], []
    for start in range(0, len(prompts), columns):
        chunk, texts = list(images[start : start + columns]), lines[start : start + columns]
        pad = columns - len(chunk)
        rows.append((f"{label} {start + 1}-{start + len(chunk)}", chunk + [np.zeros_like(images[0])] * pad))
        notes.append(texts + [""] * pad)
    return captioned_grid(rows, [""] * columns, path, title, notes)  # per-image prompts go in as notes
